package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"runtime"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// The dirty ring (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, Documentation/virt/kvm/
// api.rst): each vCPU pushes the pages it dirties, as struct kvm_dirty_gfn
// {u32 flags; u32 slot; u64 offset}, onto a ring the VMM maps from the
// vCPU's fd. The VMM reads entries in order from its own fetch index while
// their flags say DIRTY (an acquire load), records (slot, offset), marks
// each RESET (a release store), then asks KVM_RESET_DIRTY_RINGS to
// write-protect the pages again and free the entries. sync/atomic's loads
// and stores are sequentially consistent, stronger than both.

const (
	gfnSize  = 16     // sizeof(struct kvm_dirty_gfn)
	gfnDirty = 1 << 0 // KVM_DIRTY_GFN_F_DIRTY
	gfnReset = 1 << 1 // KVM_DIRTY_GFN_F_RESET

	// dirtyRingPageOffset is KVM_DIRTY_LOG_PAGE_OFFSET: the ring is mapped
	// from the vCPU fd at this many pages.
	dirtyRingPageOffset = 64
)

// dirtyRing is one vCPU's ring, mapped from its fd (or, in tests, any
// memory laid out the same way).
type dirtyRing struct {
	mem   []byte // n entries of gfnSize bytes
	n     uint32 // entries, a power of two
	fetch uint32 // the next entry to read, counting from 0 and wrapping
	vcpu  int    // the vCPU's id, for errors
	total uint64 // entries harvested from this ring so far
}

func newDirtyRing(mem []byte, vcpu int) *dirtyRing {
	return &dirtyRing{mem: mem, n: uint32(len(mem) / gfnSize), vcpu: vcpu}
}

// harvest reads the ring's entries in order from its fetch index, calling
// visit with each entry's slot and page offset and then marking it
// harvested, until an entry is not DIRTY (at most one ring's worth). It
// returns the number of entries read.
func (r *dirtyRing) harvest(visit func(slot uint32, offset uint64)) int {
	k := uint32(0)
	for ; k < r.n; k++ {
		i := r.fetch & (r.n - 1)
		if r.loadFlags(i)&gfnDirty == 0 {
			break
		}
		// The acquire load above orders these reads after KVM's writes
		// of the entry.
		e := r.mem[int(i)*gfnSize:][:gfnSize]
		visit(binary.NativeEndian.Uint32(e[4:]), binary.NativeEndian.Uint64(e[8:]))
		r.storeFlags(i, gfnReset)
		r.fetch++
	}
	r.total += uint64(k)
	return int(k)
}

// DirtyRingEntryError reports ring entries a harvest dropped because they
// named no page of a dirty-logged slot in the VM's table. It wraps
// ErrDirtyRingEntry. Such entries are legitimate in one case: the guest
// wrote to a slot that was then deleted, shrunk or stopped logging before
// the entry was harvested (the package harvests before each such change,
// so only a write racing with the change leaves one). Anything else means
// the ring was written by someone other than KVM.
type DirtyRingEntryError struct {
	VCPU   int    // the vCPU whose ring held the first dropped entry
	Slot   uint32 // its slot field: address space << 16 | slot number
	Offset uint64 // its page offset within the slot
	Reason string // why it names no logged page
	Count  int    // entries dropped since the last report, this one included
}

// Error describes the first dropped entry and how many there were.
func (e *DirtyRingEntryError) Error() string {
	return fmt.Sprintf("kvm: dirty ring of vCPU %d: entry for slot %d (address space %d) page %d: %s; %d entries "+
		"dropped", e.VCPU, e.Slot&0xffff, e.Slot>>16, e.Offset, e.Reason, e.Count)
}

// Unwrap returns ErrDirtyRingEntry.
func (e *DirtyRingEntryError) Unwrap() error { return ErrDirtyRingEntry }

// ringState is a VM's dirty-ring mode: its rings, and the pages harvested
// from them that GetDirtyLog has not handed out yet.
//
// mu comes after VM.mu and a VCPU's mu, and before the slot table's tmu,
// which a harvest holds for reading; nothing else is acquired with mu
// held. Run takes it, with its vCPU's mu, to harvest after a ring-full exit:
// so mu is never held while waiting for a vCPU or for the VM's lock.
type ringState struct {
	mu      sync.Mutex
	bytes   int                      // ring size; 0: the VM uses dirty bitmaps
	closed  bool                     // the VM fd is closed, or about to be
	rings   []*dirtyRing             // one per open vCPU
	pending map[uint32]*pendingPages // per slot: harvested pages not handed out yet
	marked  bool                     // entries marked RESET since the last KVM_RESET_DIRTY_RINGS
	bad     *DirtyRingEntryError
	reset   func() error // KVM_RESET_DIRTY_RINGS (tests substitute a fake kernel)
}

// pendingPages is one slot's harvested pages, as GetDirtyLog's bitmap. It is
// kept and cleared, not dropped, when handed out: a large slot's bitmap is
// not reallocated every round.
type pendingPages struct {
	bits []uint64
	any  bool // a bit is set
}

// EnableDirtyRing makes the VM log dirty pages into one ring per vCPU of
// bytes bytes (KVM_CAP_DIRTY_LOG_RING_ACQ_REL) instead of a bitmap per
// slot. It must be called before the VM's first vCPU is created
// (ErrVCPUExists otherwise, even if that vCPU was closed), and not
// together with EnableManualDirtyLog (ErrDirtyLogMode). bytes must be a
// power of two, a multiple of the page size, and at most what the kernel
// offers (Capabilities.DirtyRingAcqRel, 1 MiB on x86 today), else
// ErrDirtyRingSize; the kernel also refuses rings smaller than the entries
// it reserves (64, plus 512 on Intel hosts that log with PML), which is
// ErrDirtyRingSize too. A kernel without the ring is ErrUnsupported. On
// x86 a kernel offering only the older KVM_CAP_DIRTY_LOG_RING (Linux
// 5.11 to 6.0) gets that one, which this package's accesses also satisfy.
//
// Slots still log dirty pages only with LogDirtyPages, and GetDirtyLog
// still returns each slot's bitmap, built from the rings' entries; so code
// written for the bitmap (guestmem's dirty tracking) works unchanged. See
// HarvestDirtyRings for what the ring changes.
func (vm *VM) EnableDirtyRing(bytes int) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return fmt.Errorf("kvm: EnableDirtyRing: %w", errVMClosed)
	}
	c, max := CapDirtyLogRingAcqRel, vm.caps.DirtyRingAcqRel
	if max <= 0 && runtime.GOARCH == "amd64" && vm.caps.DirtyRingBytes > 0 {
		c, max = CapDirtyLogRing, vm.caps.DirtyRingBytes
	}
	switch {
	case vm.ring.bytes != 0:
		return fmt.Errorf("kvm: EnableDirtyRing: %w: the dirty ring is enabled already (%d bytes)", ErrDirtyLogMode,
			vm.ring.bytes)
	case vm.manual:
		return fmt.Errorf("kvm: EnableDirtyRing: %w: manual dirty-log protect is on, and the dirty ring replaces "+
			"the bitmaps it applies to", ErrDirtyLogMode)
	case vm.vcpusMade > 0:
		return fmt.Errorf("kvm: EnableDirtyRing: %w: %d vCPUs were created; enable the ring before the first",
			ErrVCPUExists, vm.vcpusMade)
	case max <= 0:
		return fmt.Errorf("kvm: EnableDirtyRing: %w: KVM_CAP_DIRTY_LOG_RING_ACQ_REL", ErrUnsupported)
	}
	if err := checkRingSize(bytes, max); err != nil {
		return fmt.Errorf("kvm: EnableDirtyRing: %w", err)
	}
	err := retryErr(func() error { return enableCapIoctl(vm.f.Fd(), c, uint64(bytes)) })
	switch {
	case errors.Is(err, syscall.EINVAL):
		return fmt.Errorf("kvm: EnableDirtyRing: %w: the kernel refused %d bytes (%v): smaller than the entries it "+
			"reserves, or the VM has vCPUs or a ring made outside this package", ErrDirtyRingSize, bytes,
			ioctlErr("KVM_ENABLE_CAP", err))
	case errors.Is(err, syscall.E2BIG):
		return fmt.Errorf("kvm: EnableDirtyRing: %w: %d bytes is above the kernel's maximum (%v)", ErrDirtyRingSize,
			bytes, ioctlErr("KVM_ENABLE_CAP", err))
	case err != nil:
		return fmt.Errorf("kvm: EnableDirtyRing: %w", ioctlErr("KVM_ENABLE_CAP", err))
	}
	fd := vm.f.Fd()
	vm.ring.mu.Lock()
	vm.ring.bytes = bytes
	vm.ring.reset = func() error { return resetDirtyRingsIoctl(fd) }
	vm.ring.mu.Unlock()
	return nil
}

// checkRingSize checks bytes against the rules the kernel applies, with
// max the largest ring it offers.
func checkRingSize(bytes, max int) error {
	ps := os.Getpagesize()
	switch {
	case bytes <= 0 || bits.OnesCount(uint(bytes)) != 1:
		return fmt.Errorf("%w: %d bytes is not a power of two", ErrDirtyRingSize, bytes)
	case bytes%ps != 0:
		return fmt.Errorf("%w: %d bytes is not a multiple of the page size (%d)", ErrDirtyRingSize, bytes, ps)
	case bytes > max:
		return fmt.Errorf("%w: %d bytes is above the kernel's maximum, %d", ErrDirtyRingSize, bytes, max)
	}
	return nil
}

// DirtyRingBytes returns the size of each vCPU's dirty ring, or 0 if the VM
// logs dirty pages in bitmaps (EnableDirtyRing was not called).
func (vm *VM) DirtyRingBytes() int {
	vm.ring.mu.Lock()
	defer vm.ring.mu.Unlock()
	return vm.ring.bytes
}

// HarvestDirtyRings reads every vCPU's dirty ring, records each entry's page
// in the VM's set of harvested pages, and then, if it read anything, calls
// KVM_RESET_DIRTY_RINGS once, which write-protects those pages again so the
// guest's next write to one is logged anew. It returns the number of
// entries read. GetDirtyLog hands the harvested pages out, one slot at a
// time, as a bitmap exactly like the one KVM_GET_DIRTY_LOG fills: bit i
// (bit i%64 of word i/64) is page i of the slot; a page written several
// times is one bit. GetDirtyLog harvests by itself, so calling
// HarvestDirtyRings is never needed for correctness: it empties the rings
// early (a VMM may call it from a goroutine of its own, so vCPUs rarely
// stop on a full ring) and reports dropped entries.
//
// Entries that name no page of a dirty-logged slot in the table (a slot
// deleted, shrunk or no longer logging since the guest wrote; an address
// space other than 0, which this package makes no slots in) are consumed
// and dropped; HarvestDirtyRings then returns a *DirtyRingEntryError
// (ErrDirtyRingEntry) describing the first and counting them, including
// those dropped by the harvests GetDirtyLog and Run made since the last
// report. Every valid entry has been recorded when it does.
//
// Concurrency: HarvestDirtyRings, GetDirtyLog and the slot changes may be
// called from any goroutine while vCPUs run; KVM appends to a running
// vCPU's ring while it is read, and a page is reported either by this
// harvest or by a later one. The guarantee a VMM copying memory needs
// holds as with the bitmap: a write to a page that lands after
// HarvestDirtyRings (or GetDirtyLog) returns is reported by a later call,
// so a page copied after the call that reported it is either current or
// reported again. The harvests of one VM are serialized.
//
// A ring fills when the guest dirties more pages between harvests than it
// holds (less the kernel's reserved entries); the vCPU then leaves the
// guest with KVM_EXIT_DIRTY_RING_FULL, and Run harvests every ring, resets
// them and enters the guest again, without returning (see Run).
func (vm *VM) HarvestDirtyRings() (int, error) {
	vm.ring.mu.Lock()
	defer vm.ring.mu.Unlock()
	if vm.ring.closed {
		return 0, fmt.Errorf("kvm: HarvestDirtyRings: %w", errVMClosed)
	}
	if vm.ring.bytes == 0 {
		return 0, fmt.Errorf("kvm: HarvestDirtyRings: %w: the VM logs dirty pages in bitmaps (no EnableDirtyRing)",
			ErrDirtyLogMode)
	}
	n, err := vm.harvestLocked()
	if err != nil {
		return n, fmt.Errorf("kvm: HarvestDirtyRings: %w", err)
	}
	if bad := vm.ring.bad; bad != nil {
		vm.ring.bad = nil
		return n, bad
	}
	return n, nil
}

// harvestLocked harvests every ring into pending and resets the rings if
// any entry was marked since the last reset. The caller holds ring.mu, and
// the VM is open. On a reset failure, the entries are recorded and stay
// marked; the next harvest resets them.
func (vm *VM) harvestLocked() (int, error) {
	n := 0
	vm.tmu.RLock()
	for _, r := range vm.ring.rings {
		n += r.harvest(func(slot uint32, off uint64) { vm.recordLocked(r, slot, off) })
	}
	vm.tmu.RUnlock()
	if n > 0 {
		vm.ring.marked = true
	}
	if !vm.ring.marked {
		return n, nil
	}
	if err := vm.ring.reset(); err != nil {
		return n, ioctlErr("KVM_RESET_DIRTY_RINGS", err)
	}
	vm.ring.marked = false
	return n, nil
}

// recordLocked adds one entry to pending, or counts it as dropped. The
// caller holds ring.mu and tmu (for reading).
func (vm *VM) recordLocked(r *dirtyRing, slot uint32, off uint64) {
	as, id := slot>>16, slot&0xffff
	reason := ""
	s, ok := vm.slots[id]
	switch {
	case as != 0:
		reason = "an address space this package makes no slots in"
	case !ok:
		reason = "no such slot in the table"
	case s.Flags&LogDirtyPages == 0:
		reason = "the slot does not log dirty pages"
	case off >= s.Pages():
		reason = fmt.Sprintf("beyond the slot's %d pages", s.Pages())
	}
	if reason != "" {
		if vm.ring.bad == nil {
			vm.ring.bad = &DirtyRingEntryError{VCPU: r.vcpu, Slot: slot, Offset: off, Reason: reason}
		}
		vm.ring.bad.Count++
		return
	}
	p := vm.ring.pending[id]
	if words := DirtyBitmapWords(s.Pages()); p == nil || uint64(len(p.bits)) != words {
		if vm.ring.pending == nil {
			vm.ring.pending = map[uint32]*pendingPages{}
		}
		p = &pendingPages{bits: make([]uint64, words)}
		vm.ring.pending[id] = p
	}
	p.bits[off/64] |= 1 << (off % 64)
	p.any = true
}

// ringDirtyLog is GetDirtyLog for a VM in ring mode: harvest, then move
// slot s's pages into bitmap (which holds at least DirtyBitmapWords words).
// The caller holds vm.mu.
func (vm *VM) ringDirtyLog(s Slot, bitmap []uint64) error {
	vm.ring.mu.Lock()
	defer vm.ring.mu.Unlock()
	if _, err := vm.harvestLocked(); err != nil {
		return err // the pages stay pending for the next call
	}
	words := DirtyBitmapWords(s.Pages())
	bitmap = bitmap[:words]
	if p := vm.ring.pending[s.ID]; p != nil && p.any && len(p.bits) == len(bitmap) {
		copy(bitmap, p.bits)
		clear(p.bits)
		p.any = false
	} else {
		clear(bitmap)
	}
	return nil
}

// slotChanging is called, with vm.mu held, before slot old changes to
// new (new.Size 0: deleted). On a VM in ring mode, unless the slot keeps
// its memory, size and logging (a move, or a flag change that keeps
// LogDirtyPages), it harvests, so entries for the old slot are taken while
// the table still describes it, and says the slot's pending pages must be
// dropped (dropPending) once the change is made: with the bitmap, KVM
// drops the log of such a slot too.
func (vm *VM) slotChanging(old, new Slot) (drop bool) {
	if vm.ring.bytes == 0 ||
		(new.Size == old.Size && new.HostAddr == old.HostAddr && new.Flags&LogDirtyPages != 0) {
		return false
	}
	vm.ring.mu.Lock()
	defer vm.ring.mu.Unlock()
	if vm.ring.closed {
		return false
	}
	_, _ = vm.harvestLocked() // a failed reset is retried by the next harvest
	return true
}

// dropPending forgets slot id's harvested pages.
func (vm *VM) dropPending(id uint32) {
	vm.ring.mu.Lock()
	defer vm.ring.mu.Unlock()
	delete(vm.ring.pending, id)
}

// mapDirtyRing maps vCPU c's dirty ring if the VM has rings. The caller
// holds vm.mu.
func (vm *VM) mapDirtyRing(c *VCPU) error {
	bytes := vm.ring.bytes
	if bytes == 0 {
		return nil
	}
	mem, err := unix.Mmap(int(c.f.Fd()), int64(dirtyRingPageOffset*os.Getpagesize()), bytes,
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("kvm: mapping vCPU %d dirty ring: %w", c.id, os.NewSyscallError("mmap", err))
	}
	c.ring = newDirtyRing(mem, c.id)
	vm.ring.mu.Lock()
	vm.ring.rings = append(vm.ring.rings, c.ring)
	vm.ring.mu.Unlock()
	return nil
}

// unmapDirtyRing harvests vCPU c's ring one last time (its pages are not
// lost: a closed vCPU's ring lives on in the kernel until the VM goes, and
// the next reset frees the entries) and unmaps it.
func (vm *VM) unmapDirtyRing(c *VCPU) error {
	r := c.ring
	if r == nil {
		return nil
	}
	vm.ring.mu.Lock()
	defer vm.ring.mu.Unlock()
	if !vm.ring.closed {
		vm.tmu.RLock()
		if r.harvest(func(slot uint32, off uint64) { vm.recordLocked(r, slot, off) }) > 0 {
			vm.ring.marked = true
		}
		vm.tmu.RUnlock()
	}
	for i, o := range vm.ring.rings {
		if o == r {
			vm.ring.rings = append(vm.ring.rings[:i], vm.ring.rings[i+1:]...)
			break
		}
	}
	c.ring = nil
	return os.NewSyscallError("munmap", unix.Munmap(r.mem))
}

// closeRings marks the ring state closed before the VM fd is closed.
func (vm *VM) closeRings() {
	vm.ring.mu.Lock()
	defer vm.ring.mu.Unlock()
	vm.ring.closed = true
	vm.ring.pending = nil
}

// ringFull handles a KVM_EXIT_DIRTY_RING_FULL of vCPU c: harvest every
// ring and reset them. last is the number of entries harvested from c's
// ring by the previous look; progress is false when nothing has been taken
// from it since, which means the kernel reports a full ring this package
// cannot see entries in.
func (vm *VM) ringFull(c *VCPU, last uint64) (total uint64, progress bool, err error) {
	vm.ring.mu.Lock()
	defer vm.ring.mu.Unlock()
	if vm.ring.closed {
		return 0, false, errVMClosed
	}
	if _, err := vm.harvestLocked(); err != nil {
		return c.ring.total, true, err
	}
	return c.ring.total, c.ring.total != last, nil
}

// ringTotal returns the entries harvested so far from c's ring.
func (vm *VM) ringTotal(c *VCPU) uint64 {
	vm.ring.mu.Lock()
	defer vm.ring.mu.Unlock()
	return c.ring.total
}
