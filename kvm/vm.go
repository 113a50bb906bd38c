package kvm

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"os"
	"slices"
	"sync"
	"syscall"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
)

// SlotFlags are the flags of a memory slot (KVM_MEM_*).
type SlotFlags uint32

const (
	// LogDirtyPages turns on the slot's dirty log (KVM_MEM_LOG_DIRTY_PAGES).
	LogDirtyPages SlotFlags = 1 << 0
	// ReadOnly makes the slot read-only for the guest: reads see the
	// memory, writes exit to the VMM as MMIO (KVM_MEM_READONLY).
	ReadOnly SlotFlags = 1 << 1
)

func (f SlotFlags) String() string {
	var s []byte
	if f&LogDirtyPages != 0 {
		s = append(s, "log-dirty"...)
	}
	if f&ReadOnly != 0 {
		if len(s) > 0 {
			s = append(s, '|')
		}
		s = append(s, "read-only"...)
	}
	if len(s) == 0 {
		return "none"
	}
	return string(s)
}

// Slot is a memory slot: guest-physical [GPA, GPA+Size) backed by host
// memory at HostAddr.
type Slot struct {
	ID       uint32
	GPA      uint64
	Size     uint64
	HostAddr uintptr
	Flags    SlotFlags
}

// End returns the first guest address past the slot.
func (s Slot) End() uint64 { return s.GPA + s.Size }

// Pages returns the number of 4 KiB pages in the slot.
func (s Slot) Pages() uint64 { return s.Size / pageSize }

const pageSize = 4096

// VM is a KVM virtual machine with a table of its memory slots. The table
// checks every slot change before the kernel sees it. It is safe for
// concurrent use.
type VM struct {
	mu       sync.Mutex
	f        *os.File
	kvmFD    *os.File // for KVM_GET_VCPU_MMAP_SIZE
	slots    map[uint32]Slot
	maxSlots int
	caps     Capabilities
	manual   bool // manual dirty-log protect enabled
	vcpus    []*VCPU
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
		dup, err := syscall.Dup(int(fd))
		if err != nil {
			syscall.Close(int(vmfd))
			return os.NewSyscallError("dup", err)
		}
		syscall.CloseOnExec(dup)
		syscall.CloseOnExec(int(vmfd))
		vm = &VM{f: os.NewFile(vmfd, "kvm-vm"), kvmFD: os.NewFile(uintptr(dup), d.path),
			slots: map[uint32]Slot{}, maxSlots: caps.Memslots, caps: caps}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("kvm: creating VM: %w", err)
	}
	if vm.maxSlots <= 0 {
		vm.maxSlots = 32 // KVM_CAP_NR_MEMSLOTS absent: the historic minimum
	}
	return vm, nil
}

// Capabilities returns the host capabilities read when the VM was created.
func (vm *VM) Capabilities() Capabilities { return vm.caps }

// MaxSlots returns the number of memory slots the kernel offers.
func (vm *VM) MaxSlots() int { return vm.maxSlots }

// Close closes the VM's vCPUs and the VM. Host memory that slots pointed at
// stays mapped and belongs to the caller. Closing twice returns nil.
func (vm *VM) Close() error {
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
	errs = append(errs, vm.f.Close(), vm.kvmFD.Close())
	vm.f = nil
	vm.slots = nil
	return errors.Join(errs...)
}

// Slots returns the slots in use, lowest guest address first.
func (vm *VM) Slots() []Slot {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	out := make([]Slot, 0, len(vm.slots))
	for _, s := range vm.slots {
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b Slot) int {
		if a.GPA < b.GPA {
			return -1
		}
		if a.GPA > b.GPA {
			return 1
		}
		return 0
	})
	return out
}

// Slot returns slot id, or ErrNoSlot.
func (vm *VM) Slot(id uint32) (Slot, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return Slot{}, &SlotError{Op: "Slot", Slot: id, Err: ErrClosed}
	}
	s, ok := vm.slots[id]
	if !ok {
		return Slot{}, &SlotError{Op: "Slot", Slot: id, Err: ErrNoSlot}
	}
	return s, nil
}

// FreeSlot returns the lowest slot number not in use, or ErrSlotLimit.
func (vm *VM) FreeSlot() (uint32, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.freeSlotLocked(nil)
}

func (vm *VM) freeSlotLocked(taken map[uint32]bool) (uint32, error) {
	if vm.f == nil {
		return 0, ErrClosed
	}
	for id := uint32(0); int(id) < vm.maxSlots; id++ {
		if _, used := vm.slots[id]; !used && !taken[id] {
			return id, nil
		}
	}
	return 0, fmt.Errorf("%w: all %d slots in use", ErrSlotLimit, vm.maxSlots)
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
	if _, c := bits.Add64(s.GPA, s.Size, 0); c != 0 || s.HostAddr == 0 ||
		uint64(s.HostAddr) > math.MaxUint64-s.Size {
		return fmt.Errorf("%w: guest %#x + %#x (host %#x) overflows", ErrSlotSize, s.GPA, s.Size, s.HostAddr)
	}
	if s.Flags&^(LogDirtyPages|ReadOnly) != 0 {
		return fmt.Errorf("%w: unknown flags %#x", ErrSlotFlags, uint32(s.Flags))
	}
	if s.Flags&ReadOnly != 0 && !vm.caps.ReadonlyMem {
		return fmt.Errorf("%w: read-only slots need KVM_CAP_READONLY_MEM, which this kernel lacks", ErrSlotFlags)
	}
	for id, o := range vm.slots {
		if id != s.ID && s.GPA < o.End() && o.GPA < s.End() {
			return fmt.Errorf("%w: guest [%#x, %#x) overlaps slot %d [%#x, %#x)", ErrSlotOverlap, s.GPA, s.End(), id,
				o.GPA, o.End())
		}
	}
	return nil
}

// SetSlot creates slot s.ID or changes it. KVM can move a slot (new GPA,
// same size and host address) or change its flags in place; any other
// change (size, host address) is done by deleting the slot and creating it
// again, during which the guest sees no memory there. The table refuses
// slot numbers beyond the limit, overlapping guest ranges, unaligned or
// overflowing ranges and unknown flags before the kernel sees them.
func (vm *VM) SetSlot(s Slot) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return &SlotError{Op: "SetSlot", Slot: s.ID, Err: ErrClosed}
	}
	if err := vm.check(s); err != nil {
		return &SlotError{Op: "SetSlot", Slot: s.ID, Err: err}
	}
	if old, ok := vm.slots[s.ID]; ok && (old.Size != s.Size || old.HostAddr != s.HostAddr) {
		if err := vm.setRegion(old.ID, 0, old.GPA, 0, 0); err != nil {
			return &SlotError{Op: "SetSlot", Slot: s.ID, Err: err}
		}
		delete(vm.slots, s.ID)
	}
	if err := vm.setRegion(s.ID, uint32(s.Flags), s.GPA, s.Size, s.HostAddr); err != nil {
		return &SlotError{Op: "SetSlot", Slot: s.ID, Err: err}
	}
	vm.slots[s.ID] = s
	return nil
}

// DeleteSlot removes slot id (a size-0 KVM_SET_USER_MEMORY_REGION). When it
// returns, no vCPU can reach the slot's host memory through KVM any more:
// the caller may unmap it.
func (vm *VM) DeleteSlot(id uint32) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return &SlotError{Op: "DeleteSlot", Slot: id, Err: ErrClosed}
	}
	s, ok := vm.slots[id]
	if !ok {
		return &SlotError{Op: "DeleteSlot", Slot: id, Err: ErrNoSlot}
	}
	if err := vm.setRegion(id, 0, s.GPA, 0, 0); err != nil {
		return &SlotError{Op: "DeleteSlot", Slot: id, Err: err}
	}
	delete(vm.slots, id)
	return nil
}

func (vm *VM) setRegion(slot, flags uint32, gpa, size uint64, uaddr uintptr) error {
	name := "KVM_SET_USER_MEMORY_REGION"
	if vm.caps.UserMemory2 {
		name = "KVM_SET_USER_MEMORY_REGION2"
	}
	err := retryErr(func() error {
		return setUserMemoryRegion(vm.f.Fd(), vm.caps.UserMemory2, slot, flags, gpa, size, uaddr)
	})
	if errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("%w: the kernel reports an overlap (%v)", ErrSlotOverlap, ioctlErr(name, err))
	}
	return ioctlErr(name, err)
}

// DirtyBitmapBytes returns the bytes needed for one bit per page of a slot
// of pages pages: ceil(pages/8).
func DirtyBitmapBytes(pages uint64) uint64 { return (pages + 7) / 8 }

// DirtyBitmapWords returns the 64-bit words a dirty bitmap for pages pages
// takes: the kernel copies whole words, so this is what GetDirtyLog needs.
func DirtyBitmapWords(pages uint64) uint64 { return (pages + 63) / 64 }

// GetDirtyLog copies the dirty bitmap of slot id into bitmap: bit i (bit
// i%64 of word i/64) is page i of the slot. Without manual protect it also
// resets the log; with it (EnableManualDirtyLog), pages stay dirty until
// ClearDirtyLog. bitmap needs DirtyBitmapWords(pages) words.
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
	if err := retryErr(func() error { return getDirtyLog(vm.f.Fd(), id, bitmap) }); err != nil {
		return &SlotError{Op: "GetDirtyLog", Slot: id, Err: ioctlErr("KVM_GET_DIRTY_LOG", err)}
	}
	return nil
}

func (vm *VM) loggingSlot(op string, id uint32) (Slot, error) {
	if vm.f == nil {
		return Slot{}, &SlotError{Op: op, Slot: id, Err: ErrClosed}
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
		return ErrClosed
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
	if !vm.manual {
		return &SlotError{Op: "ClearDirtyLog", Slot: id, Err: fmt.Errorf("%w: manual dirty-log protect is off "+
			"(call EnableManualDirtyLog)", ErrUnsupported)}
	}
	if first%64 != 0 || n == 0 || first > s.Pages() || n > s.Pages()-first || n > math.MaxUint32 {
		return &SlotError{Op: "ClearDirtyLog", Slot: id, Err: fmt.Errorf("%w: pages [%d, +%d) of %d (first must be "+
			"a multiple of 64)", ErrSlotSize, first, n, s.Pages())}
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
