package guestmem

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"math/bits"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/internal/reentry"
	"github.com/gmem-vmm/gmem/kvm"
)

// Backing says what memory backs guest RAM.
type Backing int

const (
	// Anonymous is private anonymous memory: the fastest to populate, and
	// able to use transparent hugepages where the host enables them for
	// anonymous memory. No other process can map it.
	Anonymous Backing = iota
	// Memfd is one memfd shared by all regions at increasing offsets
	// (crosvm's model): another process, such as a vhost-user device, can
	// map guest RAM through the fd. Its size is sealed.
	Memfd
	// Hugetlb is one hugetlb memfd (MFD_HUGETLB) with pages of the size set
	// by WithHugetlb; the host needs a pool of such pages. Its size is sealed.
	Hugetlb
	// File maps an existing file privately (copy-on-write), as restoring
	// from a snapshot file does: pages load on first touch and writes never
	// reach the file.
	File
	// GuestMemfd is guest_memfd memory KVM created for one VM
	// (KVM_CREATE_GUEST_MEMFD, chosen by WithGuestMemfd), mapped shared by
	// the host (Linux 6.18): KVM maps its pages for the guest straight from
	// the file. It registers only with that VM, has no dirty log, no
	// hugepages, no KSM and no userfaultfd (ErrGuestMemfdLimit), and
	// another process can map it through FD.
	GuestMemfd
)

func (b Backing) String() string {
	switch b {
	case Anonymous:
		return "anonymous"
	case Memfd:
		return "memfd"
	case Hugetlb:
		return "hugetlb"
	case File:
		return "file"
	case GuestMemfd:
		return "guest_memfd"
	}
	return fmt.Sprintf("Backing(%d)", int(b))
}

// Option configures New.
type Option func(*config)

type config struct {
	backing  Backing
	hugeSize uint64
	file     *os.File
	gmemVM   *kvm.VM // WithGuestMemfd
	top      GuestAddress
	noTHP    bool
	guard    uint64
	name     string
	hotplug  uint64
	expect   Layout    // Restore: the layout the snapshot must have
	backings []string  // the backing options given, to refuse two
	place    placement // WithNUMA, WithKSM
}

// Each backing is chosen by one option; giving two is ErrBadOption. With
// none, guest RAM is Anonymous.

// WithAnonymous backs guest RAM with private anonymous memory (the default).
func WithAnonymous() Option { return backingOption("WithAnonymous", Anonymous, nil) }

// WithMemfd backs guest RAM with one sealed memfd shared by all regions at
// increasing offsets (crosvm's model), which another process can map.
func WithMemfd() Option { return backingOption("WithMemfd", Memfd, nil) }

// WithHugetlb backs guest RAM with a hugetlb memfd of pageSize pages
// (2 MiB or 1 GiB on x86). Region addresses and sizes must be multiples of it.
func WithHugetlb(pageSize uint64) Option {
	o := backingOption("WithHugetlb", Hugetlb, nil)
	return func(c *config) { o(c); c.hugeSize = pageSize }
}

// WithFile backs guest RAM with f, mapped privately: region i is at the file
// offset it would have in a Memfd backing of the same layout (FileSize gives
// the size needed). The file is never modified. f may be closed after New.
// A nil f is ErrBacking.
func WithFile(f *os.File) Option { return backingOption("WithFile", File, f) }

// WithGuestMemfd backs guest RAM with guest_memfd memory created on vm at
// New (KVM_CREATE_GUEST_MEMFD with GuestMemfdMmap|GuestMemfdInitShared),
// sized for the layout and the hotplug space (WithHotplug: its size is
// fixed at creation) and mapped shared, regions at increasing 2 MiB-aligned
// offsets as for WithMemfd. The memory registers only with vm. What KVM
// and the kernel do not offer for guest_memfd is ErrGuestMemfdLimit: dirty
// tracking while registered (so incremental Saves and pre-copy Migrate of
// a running guest), read-only regions, hugepages, KSM, RestoreOnDemand and
// post-copy reception. A nil vm is ErrBacking; a kernel whose guest_memfd
// the host cannot map (before Linux 6.18) is ErrBacking and
// errors.ErrUnsupported.
func WithGuestMemfd(vm *kvm.VM) Option {
	o := backingOption("WithGuestMemfd", GuestMemfd, nil)
	return func(c *config) { o(c); c.gmemVM = vm }
}

func backingOption(name string, b Backing, f *os.File) Option {
	return func(c *config) {
		c.backing, c.file = b, f
		c.backings = append(c.backings, name)
	}
}

// check refuses options that contradict each other or do not apply to op.
func (c *config) check(op string) error {
	if len(c.backings) > 1 {
		if slices.Contains(c.backings, "WithGuestMemfd") && slices.Contains(c.backings, "WithHugetlb") {
			return fmt.Errorf("guestmem: %s: %w: %w: guest_memfd has no hugetlb pages (KVM_CREATE_GUEST_MEMFD "+
				"takes no page size); give WithGuestMemfd or WithHugetlb", op, ErrBadOption, ErrGuestMemfdLimit)
		}
		return fmt.Errorf("guestmem: %s: %w: %s choose different backings; give one", op, ErrBadOption,
			strings.Join(c.backings, " and "))
	}
	if op == "New" && c.expect != nil {
		return fmt.Errorf("guestmem: New: %w: WithLayout applies to Restore and RestoreLazy, whose layout "+
			"comes from the snapshot", ErrBadOption)
	}
	return c.checkPlacement(op)
}

// WithMaxAddress sets the top of the guest-physical address space (default
// MaxGuestAddress), e.g. 1 << MAXPHYADDR of the guest CPU.
func WithMaxAddress(top GuestAddress) Option { return func(c *config) { c.top = top } }

// WithoutHugepages leaves transparent hugepages off (they are requested by
// default wherever the backing allows; UseHugepages and NoHugepages change
// it later). Hugetlb memory is huge whatever this says.
func WithoutHugepages() Option { return func(c *config) { c.noTHP = true } }

// WithGuardGap sets the unmapped gap left between regions, and before the
// first and after the last, in the host address space (default 2 MiB, at
// most 1 TiB, rounded up to 2 MiB). A stray host access past a region faults
// there instead of reading a neighbour.
func WithGuardGap(n uint64) Option { return func(c *config) { c.guard = n } }

// WithName names the memfd (visible in /proc/<pid>/maps as /memfd:NAME).
func WithName(name string) Option { return func(c *config) { c.name = name } }

// ErrBacking is returned for a backing that cannot be set up as asked: an
// unknown backing, a hugetlb page size the host does not offer, or a file
// too small for the layout.
var ErrBacking = errors.New("backing unavailable")

// ErrBadOption is returned for an option value New cannot use.
var ErrBadOption = errors.New("invalid option")

// ErrGuestMemfdLimit is wrapped by the error of a call on GuestMemfd memory
// that KVM or the kernel does not do with guest_memfd: the message names
// the limit. Dirty tracking while registered (KVM refuses
// KVM_MEM_LOG_DIRTY_PAGES on guest_memfd slots), and with it incremental
// Saves and pre-copy Migrate of a running guest; read-only regions
// (KVM_MEM_READONLY is refused); registering with a VM other than the one
// the guest_memfd was created on; hugepages (hugetlb or transparent);
// KSM; RestoreOnDemand and post-copy reception (userfaultfd cannot
// register guest_memfd mappings).
var ErrGuestMemfdLimit = errors.New("not possible with guest_memfd memory")

// maxGuardGap bounds WithGuardGap: a terabyte of address space per gap.
const maxGuardGap = 1 << 40

// ErrClosed is wrapped by the error of every call on a Memory after Close.
// It is fs.ErrClosed (as are arena's and kvm's), so errors.Is(err,
// fs.ErrClosed) serves for every package, as for an *os.File.
var ErrClosed = fs.ErrClosed

// hostAlign is the alignment of regions in the host address space and in the
// memfd: 2 MiB, so transparent and shmem hugepages can back whole regions.
const hostAlign = 2 << 20

// Region is one region of guest RAM as a caller sees it: where it is in
// the guest and in this process, and its KVM slot. It is a copy: the
// memory's own record of the region is not exposed.
type Region struct {
	GPA      GuestAddress // first guest-physical address
	Size     uint64       // bytes
	ReadOnly bool         // the guest may not write it
	HostAddr uintptr      // host virtual address of GPA, valid until the region is removed
	FDOffset int64        // offset of GPA in the backing fd (FD); -1 for Anonymous
	Slot     int          // the KVM slot while registered (Register), else -1
}

// End returns the first address past the region.
func (r Region) End() GuestAddress { return r.GPA + GuestAddress(r.Size) }

// region is the memory's record of one region.
type region struct {
	GPA        GuestAddress
	Size       uint64
	ReadOnly   bool
	HostAddr   uintptr
	arenaOff   int64        // offset of the region in its arena
	FDOffset   int64        // offset in the backing fd; -1 for Anonymous
	hotplugged bool         // added by AddRegion, with an arena of its own
	host       *arena.Arena // the arena holding the region
	dirty      *dirtyBits   // host-side dirty bitmap while tracking, else nil
	pin        *pinState    // pins held on it (shared by every table version)
}

// view is r as a caller sees it, with its slot id (-1: none).
func (r region) view(slot int) Region {
	return Region{GPA: r.GPA, Size: r.Size, ReadOnly: r.ReadOnly, HostAddr: r.HostAddr, FDOffset: r.FDOffset, Slot: slot}
}

// views returns the public views of regions, with their slots (read from
// a copy published at every registration change, so no lock is taken).
func (m *Memory) views(regions []region) []Region {
	out := make([]Region, len(regions))
	slots := m.slotIDs.Load()
	for i, r := range regions {
		out[i] = r.view(-1)
		if slots != nil {
			if id, ok := (*slots)[r.GPA]; ok {
				out[i].Slot = int(id)
			}
		}
	}
	return out
}

// publishSlots makes the registration's slot numbers visible to views. The
// caller holds m.wmu and calls it after every change of them.
func (m *Memory) publishSlots() {
	if m.reg == nil {
		m.slotIDs.Store(nil)
		return
	}
	ids := maps.Clone(m.reg.slots)
	m.slotIDs.Store(&ids)
}

// End returns the first address past the region.
func (r region) End() GuestAddress { return r.GPA + GuestAddress(r.Size) }

func (r region) contains(a GuestAddress) bool { return a >= r.GPA && a < r.End() }

// Memory is a guest's physical memory: its regions, placed in one arena with
// guard gaps between them, backed as chosen, addressed by guest-physical
// address. It is safe for concurrent use. Accesses never take a lock on the
// region table (see AddRegion): they load it atomically.
type Memory struct {
	wmu      sync.Mutex // serializes changes: hotplug, Register, dirty tracking, Close
	tab      atomic.Pointer[table]
	arena    *arena.Arena // regions from New; hot-added regions have their own
	backing  Backing
	pageSize uint64          // 4 KiB, or the hugetlb page size
	fd       int             // the memfd, file or guest_memfd; -1 for Anonymous (guarded by wmu)
	gmem     *kvm.GuestMemfd // the GuestMemfd backing, owning fd
	fdSize   int64
	guard    uint64
	noTHP    bool
	top      GuestAddress
	hot      hotplugSpace // fd space for hot-added regions
	reg      *registration
	tracking bool // dirty tracking on
	hostOnly bool // the caller declared no vCPU writes the memory unregistered
	// trackSeen: the memory has been registered at some point since
	// tracking started, so KVM logged what vCPUs wrote (or it was harvested).
	trackSeen bool
	overlay   bool // parts of anonymous memory are private file mappings (lazy restore)
	snap      snapState
	od        atomic.Pointer[OnDemand] // the on-demand restore filling the memory, if any
	migrating atomic.Bool              // a Migrate is sending the memory
	place     placement                // NUMA policies and KSM, fixed by New

	// Callbacks run while holding: every user callback (a CopyTo writer, a
	// CopyFrom reader, Prefault's Progress, Save's writer) holds the region
	// table, and Save's writer holds wmu too. A call from one of them that
	// would wait for what it holds fails instead (see lock).
	slotIDs    atomic.Pointer[map[GuestAddress]uint32] // see views
	inCallback reentry.Guard                           // holds the table
	inSave     reentry.Guard                           // holds wmu
	external   []DirtySource                           // see AttachDirtySource (guarded by wmu)
}

// ErrReentered is wrapped by the error of a call made from a callback that
// holds what the call would wait for — Close, AddRegion, RemoveRegion,
// StartDirtyTracking, StopDirtyTracking and Discard of private file-backed
// memory wait for the region table, which every callback holds; Register,
// Unregister, CollectDirty and Save wait for Save, whose writer is a
// callback — rather than a deadlock. Call it after the outer call returns.
var ErrReentered = reentry.ErrReentered

// lock takes m.wmu for op, or returns an error wrapping ErrReentered when
// the calling goroutine is inside a callback holding what op would wait for:
// m.wmu (Save's writer) or, where op replaces the region table (publishes),
// the table every callback holds.
func (m *Memory) lock(op string, publishes bool) error {
	if err := m.inSave.Check(op); err != nil {
		return fmt.Errorf("guestmem: %w", err)
	}
	if publishes {
		if err := m.inCallback.Check(op); err != nil {
			return fmt.Errorf("guestmem: %w", err)
		}
	}
	m.wmu.Lock()
	return nil
}

// peek runs fn with m.wmu held: taken here, or held already by the Save
// whose writer is the caller.
func (m *Memory) peek(fn func()) {
	if _, ok := m.inSave.Holding(); ok {
		fn()
		return
	}
	m.wmu.Lock()
	defer m.wmu.Unlock()
	fn()
}

// withOp names op in err: a typed error of this package gets op in its Op
// field, an error that already speaks for the package is kept as it is, and
// any other is prefixed "guestmem: op: " — one package prefix per message.
func withOp(op string, err error) error {
	if err == nil {
		return nil
	}
	switch e := err.(type) {
	case *LayoutError:
		if e.Op == "" {
			e.Op = op
		}
		return e
	case *SnapshotError:
		if e.Op == "" {
			e.Op = op
		}
		return e
	}
	if strings.HasPrefix(err.Error(), "guestmem: ") {
		return err
	}
	return fmt.Errorf("guestmem: %s: %w", op, err)
}

func closedErr(op string) error {
	return fmt.Errorf("guestmem: %s: the guest memory is closed: %w", op, ErrClosed)
}

// New lays out guest RAM as l, backs it and maps it. Every region is
// MADV_DONTDUMP and MADV_DONTFORK, and asks for transparent hugepages where
// the backing allows (WithoutHugepages to opt out). Memfd and
// hugetlb backings are sealed against growing and shrinking, so no one can
// make the VMM fault by truncating guest RAM.
func New(l Layout, opts ...Option) (*Memory, error) {
	c := newConfig(opts)
	if err := c.check("New"); err != nil {
		return nil, err
	}
	return newMemory(l, c)
}

func newConfig(opts []Option) config {
	c := config{top: MaxGuestAddress, guard: hostAlign, name: "guest-ram"}
	for _, o := range opts {
		o(&c)
	}
	return c
}

// newMemory is New with its options applied and checked.
func newMemory(l Layout, c config) (*Memory, error) {
	pageSize := uint64(os.Getpagesize())
	if c.backing == Hugetlb {
		if c.hugeSize == 0 || bits.OnesCount64(c.hugeSize) != 1 || c.hugeSize < pageSize {
			return nil, fmt.Errorf("guestmem: New: %w: hugetlb page size %#x", ErrBacking, c.hugeSize)
		}
		pageSize = c.hugeSize
	}
	if err := l.Validate(pageSize, c.top); err != nil {
		return nil, err
	}
	if c.backing == GuestMemfd {
		if err := gmemLayout(l); err != nil {
			return nil, fmt.Errorf("guestmem: New: %w", err)
		}
	}
	specs := slices.Clone(l)
	slices.SortFunc(specs, func(a, b RegionSpec) int { return cmpAddr(a.GPA, b.GPA) })

	align := max(uint64(hostAlign), pageSize)
	if c.guard > maxGuardGap {
		return nil, fmt.Errorf("guestmem: New: guard gap %#x exceeds %#x: %w", c.guard, uint64(maxGuardGap), ErrBadOption)
	}
	guard := alignUp(c.guard, align)
	regions := make([]region, len(specs))
	var arenaCursor, fdCursor uint64 = guard, 0
	for i, s := range specs {
		regions[i] = region{GPA: s.GPA, Size: s.Size, ReadOnly: s.ReadOnly,
			arenaOff: int64(arenaCursor), FDOffset: -1, pin: &pinState{}}
		if c.backing != Anonymous {
			regions[i].FDOffset = int64(fdCursor)
			fdCursor = alignUp(fdCursor+s.Size, align)
		}
		arenaCursor = alignUp(arenaCursor+s.Size, align) + guard
	}
	if c.hotplug > maxHotplug {
		return nil, fmt.Errorf("guestmem: New: hotplug space %#x exceeds %#x: %w", c.hotplug, uint64(maxHotplug), ErrBadOption)
	}
	hot := alignUp(c.hotplug, align)
	if c.backing == GuestMemfd && c.gmemVM == nil {
		return nil, fmt.Errorf("guestmem: New: %w: WithGuestMemfd(nil): guest_memfd is created on a VM", ErrBacking)
	}
	if hot > 0 && c.backing == File {
		return nil, fmt.Errorf("guestmem: New: %w: a File backing cannot hot-add regions (WithHotplug)", ErrBacking)
	}
	m := &Memory{backing: c.backing, pageSize: pageSize, fd: -1, fdSize: int64(fdCursor + hot),
		guard: guard, noTHP: c.noTHP, top: c.top, place: c.place}
	if c.backing != Anonymous && hot > 0 {
		m.hot.free = []fdRange{{off: int64(fdCursor), n: int64(hot)}}
	}
	m.tab.Store(&table{regions: regions})
	if err := m.open(c); err != nil {
		return nil, err
	}
	a, err := arena.New(int64(arenaCursor), arena.ArenaAlign(int64(align)))
	if err != nil {
		return nil, errors.Join(fmt.Errorf("guestmem: New: reserving host address space: %w", err), m.closeFD())
	}
	m.arena = a
	for i := range regions {
		regions[i].host = a
		if err := m.mapRegion("New", &regions[i]); err != nil {
			return nil, errors.Join(err, m.Close())
		}
	}
	return m, nil
}

func alignUp(n, a uint64) uint64 { return (n + a - 1) &^ (a - 1) }

// open creates or checks the backing fd.
func (m *Memory) open(c config) error {
	switch c.backing {
	case Anonymous:
		return nil
	case Memfd, Hugetlb:
		flags := unix.MFD_CLOEXEC | unix.MFD_ALLOW_SEALING
		if c.backing == Hugetlb {
			flags |= unix.MFD_HUGETLB | bits.TrailingZeros64(c.hugeSize)<<unix.MFD_HUGE_SHIFT
		}
		fd, err := unix.MemfdCreate(c.name, flags)
		if err != nil {
			if c.backing == Hugetlb && (errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENODEV)) {
				// No pool of that page size on this host (or no MFD_HUGETLB).
				return fmt.Errorf("guestmem: New: %w: no %d-byte hugetlb pages here: %w: %w", ErrBacking, c.hugeSize,
					errors.ErrUnsupported, os.NewSyscallError("memfd_create", err))
			}
			return fmt.Errorf("guestmem: New: %w: %w", ErrBacking, os.NewSyscallError("memfd_create", err))
		}
		m.fd = fd
		if err := unix.Ftruncate(fd, m.fdSize); err != nil {
			return errors.Join(fmt.Errorf("guestmem: New: %w: sizing memfd to %#x: %w", ErrBacking, m.fdSize,
				os.NewSyscallError("ftruncate", err)), m.closeFD())
		}
		seals := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
			return errors.Join(fmt.Errorf("guestmem: New: sealing memfd: %w", os.NewSyscallError("fcntl", err)), m.closeFD())
		}
		return nil
	case GuestMemfd:
		const flags = kvm.GuestMemfdMmap | kvm.GuestMemfdInitShared
		have, err := c.gmemVM.GuestMemfdFlags()
		if err != nil {
			return fmt.Errorf("guestmem: New: %w: %w", ErrBacking, err)
		}
		if have&flags != flags {
			return fmt.Errorf("guestmem: New: %w: this kernel's guest_memfd cannot be mapped by the host (it takes "+
				"flags %v, guestmem needs %v: Linux 6.18): %w", ErrBacking, have, kvm.GuestMemfdFlags(flags),
				errors.ErrUnsupported)
		}
		g, err := c.gmemVM.CreateGuestMemfd(uint64(m.fdSize), flags)
		if err != nil {
			return fmt.Errorf("guestmem: New: %w: %w", ErrBacking, err)
		}
		m.gmem, m.fd = g, g.FD()
		return nil
	case File:
		if c.file == nil {
			return fmt.Errorf("guestmem: New: %w: WithFile(nil)", ErrBacking)
		}
		fd, err := unix.Dup(int(c.file.Fd()))
		if err != nil {
			return fmt.Errorf("guestmem: New: %w: %w", ErrBacking, os.NewSyscallError("dup", err))
		}
		m.fd = fd
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return errors.Join(fmt.Errorf("guestmem: New: %w", os.NewSyscallError("fstat", err)), m.closeFD())
		}
		if st.Size < m.fdSize {
			return errors.Join(fmt.Errorf("guestmem: New: %w: file has %d bytes, the layout needs %d", ErrBacking, st.Size, m.fdSize),
				m.closeFD())
		}
		return nil
	}
	return fmt.Errorf("guestmem: New: %w: %v", ErrBacking, c.backing)
}

// FileSize returns the size of file a File backing needs for layout l (with
// 4 KiB pages): the regions at increasing 2 MiB-aligned offsets.
func FileSize(l Layout) int64 {
	var n uint64
	for _, r := range l {
		n = alignUp(n+r.Size, hostAlign)
	}
	return int64(n)
}

func (m *Memory) closeFD() error {
	if m.gmem != nil {
		err := m.gmem.Close()
		m.fd = -1
		return err
	}
	if m.fd < 0 {
		return nil
	}
	err := unix.Close(m.fd)
	m.fd = -1
	if err != nil {
		return os.NewSyscallError("close", err)
	}
	return nil
}

// mapRegion maps r into its arena and applies the defaults, for op.
func (m *Memory) mapRegion(op string, r *region) error {
	var err error
	size := int64(r.Size)
	switch m.backing {
	// Private memory is mapped MAP_NORESERVE, as Firecracker does: a guest
	// may be larger than the host's commit limit, and running short is
	// reported by Prefault (or, unprefaulted, by the kernel's OOM handling)
	// rather than refused up front for memory the guest may never touch.
	case Anonymous:
		err = r.host.AddAnonMapping(r.arenaOff, size, arena.ProtReadWrite, arena.Private(), arena.NoReserve())
	case File:
		err = r.host.AddFDMapping(r.arenaOff, size, m.fd, r.FDOffset, arena.ProtReadWrite, arena.Private(),
			arena.NoReserve())
	default:
		err = r.host.AddFDMapping(r.arenaOff, size, m.fd, r.FDOffset, arena.ProtReadWrite)
	}
	whole := piece{a: r.host, off: r.arenaOff, n: size, gpa: r.GPA}
	if err != nil {
		return whole.inGuestTerms(op, err)
	}
	r.HostAddr = r.host.Addr() + uintptr(r.arenaOff)
	if err := m.applyPlacement(r); err != nil {
		return whole.inGuestTerms(op, err)
	}
	if err := m.applyDefaults(r.host, r.arenaOff, size); err != nil {
		return whole.inGuestTerms(op, err)
	}
	return nil
}

// applyDefaults sets DONTFORK and, where the backing allows and the caller
// did not opt out, transparent hugepages on a freshly mapped range.
func (m *Memory) applyDefaults(a *arena.Arena, off, n int64) error {
	if err := a.UseDontfork(off, n); err != nil {
		return err
	}
	// guest_memfd takes MADV_HUGEPAGE and ignores it: it has 4 KiB pages.
	if !m.noTHP && m.backing != Hugetlb && m.backing != GuestMemfd {
		return a.UseHugepages(off, n)
	}
	return nil
}

// Close unmaps guest RAM and closes the backing fd. If the memory is still
// registered with a VM that is open, its slots are deleted first, so KVM
// never points at unmapped memory. Close waits for accesses in flight; later
// calls return ErrClosed, and Close itself returns nil again.
func (m *Memory) Close() error {
	if err := m.lock("Close", true); err != nil {
		return err
	}
	defer m.wmu.Unlock()
	if m.tab.Load().closed {
		return nil
	}
	if err := takeAway("Close", m.tab.Load().regions); err != nil {
		return err
	}
	if od := m.od.Load(); od != nil {
		// First: a vCPU waiting on a userfault inside KVM would hold up the
		// deletion of its slot.
		od.close()
	}
	var errs []error
	if m.reg != nil {
		errs = append(errs, m.dropSlots(false))
	}
	old := m.publish(&table{closed: true})
	for _, r := range old.regions {
		if r.hotplugged {
			errs = append(errs, r.host.Close())
		}
	}
	if m.arena != nil {
		errs = append(errs, m.arena.Close())
	}
	errs = append(errs, m.closeFD())
	return errors.Join(errs...)
}

// Backing returns how guest RAM is backed.
func (m *Memory) Backing() Backing { return m.backing }

// FD returns the memfd, file or guest_memfd backing guest RAM, for handing
// to another process (vhost-user) with each region's FDOffset; -1 for
// Anonymous and after Close. It stays owned by the Memory.
func (m *Memory) FD() (fd int) {
	m.peek(func() { fd = m.fd }) // Close sets fd to -1
	return fd
}

// PageSize returns the page size of the backing: 4 KiB, or the hugetlb page size.
func (m *Memory) PageSize() uint64 { return m.pageSize }

// Regions returns the regions, lowest address first (none after Close).
func (m *Memory) Regions() []Region {
	t, err := m.acquire("Regions")
	if err != nil {
		return nil
	}
	defer t.release()
	return m.views(t.regions)
}

// Size returns the total bytes of guest RAM.
func (m *Memory) Size() uint64 {
	var n uint64
	for _, r := range m.Regions() {
		n += r.Size
	}
	return n
}

// Region returns the region containing a.
func (m *Memory) Region(a GuestAddress) (Region, error) {
	t, err := m.acquire("Region")
	if err != nil {
		return Region{}, err
	}
	defer t.release()
	i, ok := t.find(a)
	if !ok {
		return Region{}, &AddressError{Op: "Region", GPA: a, Len: 1, Err: ErrHole}
	}
	return m.views(t.regions[i : i+1])[0], nil
}

// HostAddress returns the host virtual address of guest address a. It stays
// valid until the region is removed or the Memory closed.
func (m *Memory) HostAddress(a GuestAddress) (uintptr, error) {
	r, err := m.Region(a)
	if ae, ok := err.(*AddressError); ok {
		ae.Op = "HostAddress"
	}
	if err != nil {
		return 0, err
	}
	return r.HostAddr + uintptr(a-r.GPA), nil
}

// gmemLayout refuses what a guest_memfd backing cannot hold: read-only
// regions, since KVM refuses KVM_MEM_READONLY on guest_memfd slots.
func gmemLayout(l Layout) error {
	for _, r := range l {
		if r.ReadOnly {
			return fmt.Errorf("%w: region [%v, +%#x) is read-only, and KVM refuses read-only guest_memfd slots "+
				"(KVM_MEM_READONLY with KVM_MEM_GUEST_MEMFD); back read-only regions otherwise", ErrGuestMemfdLimit,
				r.GPA, r.Size)
		}
	}
	return nil
}
