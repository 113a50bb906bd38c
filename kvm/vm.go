package kvm

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"math"
	"math/bits"
	"os"
	"slices"
	"sync"
	"syscall"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"golang.org/x/sys/unix"
)

// SlotFlags are the flags of a memory slot (KVM_MEM_*).
type SlotFlags uint32

const (
	// LogDirtyPages turns on the slot's dirty log (KVM_MEM_LOG_DIRTY_PAGES).
	LogDirtyPages SlotFlags = 1 << 0
	// ReadOnly makes the slot read-only for the guest: reads see the
	// memory, writes exit to the VMM as MMIO (KVM_MEM_READONLY).
	ReadOnly SlotFlags = 1 << 1
	// GuestMemfdSlot says the slot's memory is guest_memfd memory
	// (KVM_MEM_GUEST_MEMFD): KVM maps the pages of Slot.GuestMemfd from
	// Slot.GuestMemfdOffset, not those behind HostAddr. The table sets it
	// for a slot with a GuestMemfd; it cannot be combined with the other
	// two.
	GuestMemfdSlot SlotFlags = 1 << 2
)

// String names the flags: "log-dirty", "read-only", "guest-memfd", joined
// by "|", or "none".
func (f SlotFlags) String() string {
	var s []byte
	for _, n := range []struct {
		f    SlotFlags
		name string
	}{{LogDirtyPages, "log-dirty"}, {ReadOnly, "read-only"}, {GuestMemfdSlot, "guest-memfd"}} {
		if f&n.f == 0 {
			continue
		}
		if len(s) > 0 {
			s = append(s, '|')
		}
		s = append(s, n.name...)
	}
	if len(s) == 0 {
		return "none"
	}
	return string(s)
}

// Slot is a memory slot: guest-physical [GPA, GPA+Size) backed by host
// memory at HostAddr, or by guest_memfd memory.
type Slot struct {
	ID       uint32    // slot number, 0 to VM.MaxSlots()-1
	GPA      uint64    // guest-physical address, page-aligned
	Size     uint64    // bytes, a nonzero multiple of the page size
	HostAddr uintptr   // host virtual address of the memory, page-aligned
	Flags    SlotFlags // LogDirtyPages, ReadOnly, GuestMemfdSlot
	// GuestMemfd, if set, is the guest_memfd of this VM (CreateGuestMemfd)
	// whose bytes [GuestMemfdOffset, +Size) are the slot's memory; the slot
	// gets GuestMemfdSlot. HostAddr should then be the host's mapping of
	// the same bytes (KVM does not check it, but its instruction emulator
	// reaches guest memory through it).
	GuestMemfd       *GuestMemfd
	GuestMemfdOffset uint64 // page-aligned
}

// End returns the first guest address past the slot.
func (s Slot) End() uint64 { return s.GPA + s.Size }

// Pages returns the number of 4 KiB pages in the slot.
func (s Slot) Pages() uint64 { return s.Size / pageSize }

const pageSize = 4096

// MaxSlotPages is the most pages one slot may hold: the kernel refuses
// larger slots (KVM_MEM_MAX_NR_PAGES, 2^31-1 pages of 4 KiB, just under
// 8 TiB).
const MaxSlotPages = 1<<31 - 1

// VM is a KVM virtual machine with a table of its memory slots. The table
// checks every slot change before the kernel sees it. It is safe for
// concurrent use.
type VM struct {
	mu       sync.Mutex
	f        *os.File
	kvmFD    *os.File // for KVM_GET_VCPU_MMAP_SIZE and KVM_GET_SUPPORTED_CPUID
	maxSlots int
	caps     Capabilities
	manual   bool // manual dirty-log protect enabled
	vcpus    []*VCPU
	// vcpusMade counts the vCPUs ever created or adopted: KVM refuses a
	// dirty ring once one exists, even if it was closed.
	vcpusMade int

	ring ringState // the dirty rings, when EnableDirtyRing was called (dirtyring.go)

	// Pause (control.go): resume is non-nil while paused and closed by
	// Resume; inGuest counts vCPUs in runOnce; drained is closed when it
	// reaches 0 for a waiting Pause. A leaf lock.
	pmu     sync.Mutex
	resume  chan struct{}
	inGuest int
	drained chan struct{}

	closeMu  sync.Mutex // serializes Close, which runs the hooks without mu
	closing  bool       // Close has taken the hooks
	hooks    map[uint64]func()
	nextHook uint64

	// The slot table. Changed with mu held and also tmu held for writing;
	// read with either held. vCPUs classify their MMIO exits with only tmu
	// held for reading (see VCPU.Run), so tmu is a leaf lock: nothing is
	// acquired while holding it.
	tmu   sync.RWMutex
	slots map[uint32]Slot // by ID
	byGPA []Slot          // the same slots, sorted by GPA (they never overlap)
	gen   uint64          // incremented by every insertion into the table
	born  map[uint32]uint64
}

// CreateVM creates a VM. The VM keeps its own reference to the device, so
// closing the Device afterwards is fine.
func (d *Device) CreateVM() (*VM, error) {
	caps, err := d.Capabilities()
	if err != nil {
		return nil, err
	}
	var vm *VM
	err = d.withFD(func(fd uintptr) error {
		vmfd, err := retry(func() (uintptr, error) { return gokvm.CreateVM(fd) })
		if err != nil {
			return ioctlErr("KVM_CREATE_VM", err)
		}
		// The kernel makes the VM fd close-on-exec; the dup must be too,
		// atomically, in case another goroutine forks.
		dup, err := unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			syscall.Close(int(vmfd))
			return os.NewSyscallError("fcntl(F_DUPFD_CLOEXEC)", err)
		}
		vm = newVM(os.NewFile(vmfd, "kvm-vm"), os.NewFile(uintptr(dup), d.path), caps)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("kvm: creating VM: %w", err)
	}
	return vm, nil
}

func newVM(f, kvmFD *os.File, caps Capabilities) *VM {
	vm := &VM{f: f, kvmFD: kvmFD, slots: map[uint32]Slot{}, maxSlots: caps.Memslots, caps: caps}
	if vm.maxSlots <= 0 {
		vm.maxSlots = 32 // KVM_CAP_NR_MEMSLOTS absent: the historic minimum
	}
	return vm
}

// Capabilities returns the host capabilities read when the VM was created.
func (vm *VM) Capabilities() Capabilities { return vm.caps }

// MaxSlots returns the number of memory slots the kernel offers: slot
// numbers run from 0 to MaxSlots()-1.
func (vm *VM) MaxSlots() int { return vm.maxSlots }

// Close closes the VM's vCPUs (waiting for a Run in progress to return) and
// the VM. It first runs the functions given to OnClose, while the VM still
// answers every call. Host memory that slots pointed at stays mapped and
// belongs to the caller; once Close returns, KVM no longer uses it. Closing
// twice returns nil.
func (vm *VM) Close() error {
	vm.closeMu.Lock()
	defer vm.closeMu.Unlock()
	vm.mu.Lock()
	hooks := vm.hooks
	vm.hooks, vm.closing = nil, true
	vm.mu.Unlock()
	for _, id := range slices.Sorted(maps.Keys(hooks)) {
		hooks[id]()
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return nil
	}
	var errs []error
	for _, c := range vm.vcpus {
		errs = append(errs, c.Close())
	}
	vm.vcpus = nil
	vm.closeRings()
	errs = append(errs, vm.f.Close(), vm.kvmFD.Close())
	vm.f = nil
	vm.tmu.Lock()
	vm.slots, vm.byGPA = nil, nil
	vm.tmu.Unlock()
	return errors.Join(errs...)
}

// OnClose registers fn to run when Close begins, before the vCPUs and the
// VM are closed, while every call on the VM (GetDirtyLog, DeleteSlot, ...)
// still works: memory registered with the VM harvests its last dirty log
// and lets go of its slots there (guestmem does). Functions run in the
// order they were registered, on the goroutine calling Close, which holds
// no lock of the VM's but Close's own: fn must not call Close. The returned
// function unregisters fn. Once Close has begun, OnClose registers nothing
// and returns ErrClosed: a registration that succeeds is always run.
func (vm *VM) OnClose(fn func()) (cancel func(), err error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil || vm.closing {
		return func() {}, fmt.Errorf("kvm: OnClose: %w", errVMClosed)
	}
	if vm.hooks == nil {
		vm.hooks = map[uint64]func(){}
	}
	id := vm.nextHook
	vm.nextHook++
	vm.hooks[id] = fn
	return func() {
		vm.mu.Lock()
		defer vm.mu.Unlock()
		delete(vm.hooks, id)
	}, nil
}

// Slots returns the slots in use, lowest guest address first.
func (vm *VM) Slots() []Slot {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return slices.Clone(vm.byGPA)
}

// Slot returns slot id, or ErrNoSlot.
func (vm *VM) Slot(id uint32) (Slot, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return Slot{}, &SlotError{Op: "Slot", Slot: id, Err: errVMClosed}
	}
	s, ok := vm.slots[id]
	if !ok {
		return Slot{}, &SlotError{Op: "Slot", Slot: id, Err: ErrNoSlot}
	}
	return s, nil
}

// SlotAt returns the slot whose guest range holds gpa, if any.
func (vm *VM) SlotAt(gpa uint64) (Slot, bool) {
	vm.tmu.RLock()
	defer vm.tmu.RUnlock()
	return vm.slotAtLocked(gpa)
}

// generation returns the slot table's generation: a slot inserted later has
// a higher birth generation.
func (vm *VM) generation() uint64 {
	vm.tmu.RLock()
	defer vm.tmu.RUnlock()
	return vm.gen
}

// slotAtSince returns the slot holding gpa if it has been in the table, as
// it is now, since generation gen.
func (vm *VM) slotAtSince(gpa, gen uint64) (Slot, bool) {
	vm.tmu.RLock()
	defer vm.tmu.RUnlock()
	s, ok := vm.slotAtLocked(gpa)
	if !ok || vm.born[s.ID] > gen {
		return Slot{}, false
	}
	return s, true
}

func (vm *VM) slotAtLocked(gpa uint64) (Slot, bool) {
	// The first slot ending after gpa is the only one that can hold it.
	i, _ := slices.BinarySearchFunc(vm.byGPA, gpa, func(s Slot, gpa uint64) int {
		if s.End() <= gpa {
			return -1
		}
		return 1
	})
	if i < len(vm.byGPA) && vm.byGPA[i].GPA <= gpa {
		return vm.byGPA[i], true
	}
	return Slot{}, false
}

// FreeSlot returns the lowest slot number not in use, or ErrSlotLimit. The
// number may be taken by another goroutine before the caller uses it: to
// create a slot, AddSlot picks the number and creates the slot in one step.
func (vm *VM) FreeSlot() (uint32, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return 0, fmt.Errorf("kvm: FreeSlot: %w", errVMClosed)
	}
	return vm.freeLocked()
}

func (vm *VM) freeLocked() (uint32, error) {
	if len(vm.slots) < vm.maxSlots {
		for id := uint32(0); int(id) < vm.maxSlots; id++ {
			if _, used := vm.slots[id]; !used {
				return id, nil
			}
		}
	}
	return 0, fmt.Errorf("%w: all %d slots in use", ErrSlotLimit, vm.maxSlots)
}

// insertLocked adds s to the table, replacing the slot with its ID.
func (vm *VM) insertLocked(s Slot) {
	vm.tmu.Lock()
	defer vm.tmu.Unlock()
	vm.removeLocked(s.ID)
	vm.slots[s.ID] = s
	if vm.born == nil {
		vm.born = map[uint32]uint64{}
	}
	vm.gen++
	vm.born[s.ID] = vm.gen
	i, _ := slices.BinarySearchFunc(vm.byGPA, s.GPA, func(o Slot, gpa uint64) int { return cmp.Compare(o.GPA, gpa) })
	vm.byGPA = slices.Insert(vm.byGPA, i, s)
}

// removeLocked drops slot id from the table; the caller holds tmu.
func (vm *VM) removeLocked(id uint32) {
	old, ok := vm.slots[id]
	if !ok {
		return
	}
	delete(vm.slots, id)
	i, found := slices.BinarySearchFunc(vm.byGPA, old.GPA, func(o Slot, gpa uint64) int { return cmp.Compare(o.GPA, gpa) })
	if !found || vm.byGPA[i].ID != id {
		panic(fmt.Sprintf("kvm: internal error: slot %d at %#x missing from the sorted table", id, old.GPA))
	}
	vm.byGPA = slices.Delete(vm.byGPA, i, i+1)
}

func (vm *VM) deleteLocked(id uint32) {
	vm.tmu.Lock()
	defer vm.tmu.Unlock()
	vm.removeLocked(id)
}

// check validates s against the table, ignoring slot s.ID itself.
func (vm *VM) check(s Slot) error {
	if int64(s.ID) >= int64(vm.maxSlots) {
		return fmt.Errorf("%w: slot %d, the kernel offers %d (0..%d)", ErrSlotLimit, s.ID, vm.maxSlots, vm.maxSlots-1)
	}
	if s.Size == 0 {
		return fmt.Errorf("%w: size 0 (use DeleteSlot to remove a slot)", ErrSlotSize)
	}
	if s.GPA%pageSize != 0 || s.Size%pageSize != 0 || uint64(s.HostAddr)%pageSize != 0 {
		return fmt.Errorf("%w: guest %#x size %#x host %#x", ErrSlotUnaligned, s.GPA, s.Size, s.HostAddr)
	}
	if _, c := bits.Add64(s.GPA, s.Size, 0); c != 0 {
		return fmt.Errorf("%w: guest %#x + size %#x overflows", ErrSlotSize, s.GPA, s.Size)
	}
	if uint64(s.HostAddr) > math.MaxUint64-s.Size {
		return fmt.Errorf("%w: host %#x + size %#x overflows", ErrSlotSize, s.HostAddr, s.Size)
	}
	if s.HostAddr == 0 {
		return fmt.Errorf("%w: host address 0", ErrSlotSize)
	}
	if s.Pages() > MaxSlotPages {
		return fmt.Errorf("%w: %d pages, the kernel allows at most %d per slot", ErrSlotSize, s.Pages(), MaxSlotPages)
	}
	if s.Flags&^(LogDirtyPages|ReadOnly|GuestMemfdSlot) != 0 {
		return fmt.Errorf("%w: unknown flags %#x", ErrSlotFlags, uint32(s.Flags))
	}
	if s.Flags&ReadOnly != 0 && !vm.caps.ReadonlyMem {
		return fmt.Errorf("%w: read-only slots need KVM_CAP_READONLY_MEM, which this kernel lacks", ErrSlotFlags)
	}
	if err := vm.checkGuestMemfd(s); err != nil {
		return err
	}
	// The slots are sorted by GPA and disjoint, so the ones overlapping s
	// are a run starting at the first that ends after s.GPA.
	i, _ := slices.BinarySearchFunc(vm.byGPA, s.GPA, func(o Slot, gpa uint64) int {
		if o.End() <= gpa {
			return -1
		}
		return 1
	})
	for ; i < len(vm.byGPA) && vm.byGPA[i].GPA < s.End(); i++ {
		if o := vm.byGPA[i]; o.ID != s.ID {
			return fmt.Errorf("%w: guest [%#x, %#x) overlaps slot %d [%#x, %#x)", ErrSlotOverlap, s.GPA, s.End(), o.ID,
				o.GPA, o.End())
		}
	}
	return nil
}

// SetSlot creates slot s.ID or changes it. KVM can move a slot (new GPA,
// same size and host address) or change its dirty-logging flag in place;
// any other change (size, host address, the read-only flag) is done by
// deleting the slot and creating it again, during which the guest sees no
// memory there. If creating the new slot then fails, the old one is put
// back (the error says if even that failed, and the slot is then gone).
// The table refuses slot numbers beyond the limit (ErrSlotLimit),
// overlapping guest ranges (ErrSlotOverlap), unaligned (ErrSlotUnaligned),
// empty, oversized or overflowing ranges (ErrSlotSize) and unknown flags
// (ErrSlotFlags) before the kernel sees them; errors are *SlotError.
func (vm *VM) SetSlot(s Slot) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return &SlotError{Op: "SetSlot", Slot: s.ID, Err: errVMClosed}
	}
	return vm.setLocked(s)
}

// AddSlot creates a slot for s under the lowest free slot number, chosen and
// used in one step (s.ID is ignored), and returns the slot as created. Two
// goroutines adding slots at once get different numbers; FreeSlot followed
// by SetSlot can hand both the same one. It checks s as SetSlot does; no
// free number is ErrSlotLimit.
func (vm *VM) AddSlot(s Slot) (Slot, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return Slot{}, &SlotError{Op: "AddSlot", Slot: s.ID, Err: errVMClosed}
	}
	id, err := vm.freeLocked()
	if err != nil {
		return Slot{}, &SlotError{Op: "AddSlot", Slot: s.ID, Err: err}
	}
	s.ID = id
	if err := vm.setLocked(s); err != nil {
		if se, ok := err.(*SlotError); ok {
			se.Op = "AddSlot"
		}
		return Slot{}, err
	}
	return s, nil
}

// setLocked is SetSlot with mu held and the VM open; errors are *SlotError.
func (vm *VM) setLocked(s Slot) (err error) {
	if s.GuestMemfd != nil {
		s.Flags |= GuestMemfdSlot
	}
	if err := vm.check(s); err != nil {
		return &SlotError{Op: "SetSlot", Slot: s.ID, Err: err}
	}
	old, ok := vm.slots[s.ID]
	if ok && old == s {
		return nil // nothing changes (and KVM refuses to "change" a guest_memfd slot in place)
	}
	if ok && vm.slotChanging(old, s) {
		defer func() {
			if err == nil {
				vm.dropPending(s.ID)
			}
		}()
	}
	// KVM makes guest_memfd slots immutable: any change is a delete and a
	// create.
	if ok && (old.Size != s.Size || old.HostAddr != s.HostAddr || (old.Flags^s.Flags)&ReadOnly != 0 ||
		old.GuestMemfd != nil || s.GuestMemfd != nil) {
		if err := vm.setRegion(old.ID, 0, old.GPA, 0, 0); err != nil {
			return &SlotError{Op: "SetSlot", Slot: s.ID, Err: err}
		}
		vm.deleteLocked(s.ID)
		if err := vm.setSlotRegion(s); err != nil {
			if rerr := vm.setSlotRegion(old); rerr != nil {
				return &SlotError{Op: "SetSlot", Slot: s.ID, Err: fmt.Errorf("%w; restoring the old slot failed "+
					"too, so slot %d is gone: %w", err, s.ID, rerr)}
			}
			vm.insertLocked(old)
			return &SlotError{Op: "SetSlot", Slot: s.ID, Err: fmt.Errorf("%w (the old slot is back)", err)}
		}
		vm.insertLocked(s)
		return nil
	}
	if err := vm.setSlotRegion(s); err != nil {
		return &SlotError{Op: "SetSlot", Slot: s.ID, Err: err}
	}
	vm.insertLocked(s)
	return nil
}

// DeleteSlot removes slot id (a size-0 KVM_SET_USER_MEMORY_REGION). When it
// returns, no vCPU can reach the slot's host memory through KVM any more:
// the caller may unmap it. An unknown slot is ErrNoSlot.
func (vm *VM) DeleteSlot(id uint32) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return &SlotError{Op: "DeleteSlot", Slot: id, Err: errVMClosed}
	}
	s, ok := vm.slots[id]
	if !ok {
		return &SlotError{Op: "DeleteSlot", Slot: id, Err: ErrNoSlot}
	}
	drop := vm.slotChanging(s, Slot{ID: id})
	if err := vm.setRegion(id, 0, s.GPA, 0, 0); err != nil {
		return &SlotError{Op: "DeleteSlot", Slot: id, Err: err}
	}
	vm.deleteLocked(id)
	if drop {
		vm.dropPending(id)
	}
	return nil
}

// setSlotRegion creates slot s in the kernel.
func (vm *VM) setSlotRegion(s Slot) error {
	if s.GuestMemfd == nil {
		return vm.setRegion(s.ID, uint32(s.Flags), s.GPA, s.Size, s.HostAddr)
	}
	return vm.setRegionGmem(s.ID, uint32(s.Flags), s.GPA, s.Size, s.HostAddr, s.GuestMemfd.FD(), s.GuestMemfdOffset)
}

func (vm *VM) setRegion(slot, flags uint32, gpa, size uint64, uaddr uintptr) error {
	return vm.setRegionGmem(slot, flags, gpa, size, uaddr, -1, 0)
}

func (vm *VM) setRegionGmem(slot, flags uint32, gpa, size uint64, uaddr uintptr, gmemFD int, gmemOff uint64) error {
	name := "KVM_SET_USER_MEMORY_REGION"
	if vm.caps.UserMemory2 {
		name = "KVM_SET_USER_MEMORY_REGION2"
	}
	err := retryErr(func() error {
		return setUserMemoryRegion(vm.f.Fd(), vm.caps.UserMemory2, slot, flags, gpa, size, uaddr, gmemFD, gmemOff)
	})
	if errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("%w: the kernel reports an overlap (%w)", ErrSlotOverlap, ioctlErr(name, err))
	}
	return ioctlErr(name, err)
}

// DirtyBitmapBytes returns the bytes needed for one bit per page of a slot
// of pages pages: ceil(pages/8).
func DirtyBitmapBytes(pages uint64) uint64 { return pages/8 + min(pages%8, 1) }

// DirtyBitmapWords returns the 64-bit words a dirty bitmap for pages pages
// takes: ceil(pages/64). The kernel copies whole words, so this is what
// GetDirtyLog needs; it is DirtyBitmapBytes rounded up to 8, divided by 8.
func DirtyBitmapWords(pages uint64) uint64 { return pages/64 + min(pages%64, 1) }

// GetDirtyLog copies the dirty bitmap of slot id into bitmap: bit i (bit
// i%64 of word i/64) is page i of the slot. Without manual protect it also
// resets the log; with it (EnableManualDirtyLog), pages stay dirty until
// ClearDirtyLog. bitmap needs DirtyBitmapWords(pages) words; GetDirtyLog
// writes exactly those.
//
// On a VM with dirty rings (EnableDirtyRing), where the kernel keeps no
// bitmap, it harvests the rings (HarvestDirtyRings) and hands out the
// slot's harvested pages as that same bitmap, then forgets them: the pages
// written since the slot's previous GetDirtyLog, as without manual
// protect. Dropped ring entries do not fail it; HarvestDirtyRings reports
// them.
func (vm *VM) GetDirtyLog(id uint32, bitmap []uint64) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	s, err := vm.loggingSlot("GetDirtyLog", id)
	if err != nil {
		return err
	}
	if need := DirtyBitmapWords(s.Pages()); uint64(len(bitmap)) < need {
		return &SlotError{Op: "GetDirtyLog", Slot: id, Err: fmt.Errorf("%w: %d words for %d pages, need %d",
			ErrBitmapTooSmall, len(bitmap), s.Pages(), need)}
	}
	if vm.ring.bytes != 0 {
		if err := vm.ringDirtyLog(s, bitmap); err != nil {
			return &SlotError{Op: "GetDirtyLog", Slot: id, Err: err}
		}
		return nil
	}
	if err := retryErr(func() error { return getDirtyLog(vm.f.Fd(), id, bitmap) }); err != nil {
		return &SlotError{Op: "GetDirtyLog", Slot: id, Err: ioctlErr("KVM_GET_DIRTY_LOG", err)}
	}
	return nil
}

func (vm *VM) loggingSlot(op string, id uint32) (Slot, error) {
	if vm.f == nil {
		return Slot{}, &SlotError{Op: op, Slot: id, Err: errVMClosed}
	}
	s, ok := vm.slots[id]
	if !ok {
		return Slot{}, &SlotError{Op: op, Slot: id, Err: ErrNoSlot}
	}
	if s.Flags&LogDirtyPages == 0 {
		return Slot{}, &SlotError{Op: op, Slot: id, Err: ErrNotLogging}
	}
	return s, nil
}

// EnableManualDirtyLog turns on manual dirty-log protect
// (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): GetDirtyLog then only reads the log,
// and ClearDirtyLog re-protects pages, so collecting a large slot does not
// stall vCPUs on write faults all at once. Call it before creating slots
// with dirty logging.
func (vm *VM) EnableManualDirtyLog() error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return fmt.Errorf("kvm: %w", errVMClosed)
	}
	if vm.ring.bytes != 0 {
		return fmt.Errorf("kvm: EnableManualDirtyLog: %w: the VM logs into dirty rings, and manual protect "+
			"applies to bitmaps", ErrDirtyLogMode)
	}
	if !vm.caps.ManualDirtyLog {
		return fmt.Errorf("%w: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", ErrUnsupported)
	}
	const manualProtectEnable = 1
	if err := retryErr(func() error { return enableCapIoctl(vm.f.Fd(), CapManualDirtyLogProtect, manualProtectEnable) }); err != nil {
		return fmt.Errorf("kvm: enabling manual dirty-log protect: %w", ioctlErr("KVM_ENABLE_CAP", err))
	}
	vm.manual = true
	return nil
}

// ManualDirtyLog says whether EnableManualDirtyLog succeeded.
func (vm *VM) ManualDirtyLog() bool {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.manual
}

// ClearDirtyLog re-protects the pages of slot id whose bits are set in
// bitmap, which covers pages [first, first+n) of the slot (first a multiple
// of 64). Needs EnableManualDirtyLog.
func (vm *VM) ClearDirtyLog(id uint32, first, n uint64, bitmap []uint64) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	s, err := vm.loggingSlot("ClearDirtyLog", id)
	if err != nil {
		return err
	}
	if vm.ring.bytes != 0 {
		return &SlotError{Op: "ClearDirtyLog", Slot: id, Err: fmt.Errorf("%w: the VM logs into dirty rings, "+
			"where GetDirtyLog resets what it reports", ErrDirtyLogMode)}
	}
	if !vm.manual {
		return &SlotError{Op: "ClearDirtyLog", Slot: id, Err: fmt.Errorf("%w: manual dirty-log protect is off "+
			"(call EnableManualDirtyLog)", ErrUnsupported)}
	}
	if n == 0 || first > s.Pages() || n > s.Pages()-first || n > math.MaxUint32 {
		return &SlotError{Op: "ClearDirtyLog", Slot: id, Err: fmt.Errorf("%w: pages [%d, +%d) of a %d-page slot",
			ErrSlotSize, first, n, s.Pages())}
	}
	if first%64 != 0 || (n%64 != 0 && first+n != s.Pages()) {
		return &SlotError{Op: "ClearDirtyLog", Slot: id, Err: fmt.Errorf("%w: pages [%d, +%d) of a %d-page slot: the "+
			"first page and the count must be multiples of 64, except a count that reaches the slot's end",
			ErrSlotUnaligned, first, n, s.Pages())}
	}
	if uint64(len(bitmap)) < DirtyBitmapWords(n) {
		return &SlotError{Op: "ClearDirtyLog", Slot: id, Err: fmt.Errorf("%w: %d words for %d pages", ErrBitmapTooSmall,
			len(bitmap), n)}
	}
	if err := retryErr(func() error { return clearDirtyLogIoctl(vm.f.Fd(), id, first, uint32(n), bitmap) }); err != nil {
		return &SlotError{Op: "ClearDirtyLog", Slot: id, Err: ioctlErr("KVM_CLEAR_DIRTY_LOG", err)}
	}
	return nil
}
