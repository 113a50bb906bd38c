package kvm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
)

// Sentinel errors. Every error this package returns wraps one of them, or an
// *os.SyscallError naming the ioctl, so callers can use errors.Is.
var (
	// ErrNoDevice: the KVM device node does not exist, or the kernel has no
	// KVM driver bound to it.
	ErrNoDevice = errors.New("kvm: device not available")
	// ErrPermission: the device exists but this process may not open it
	// read-write.
	ErrPermission = errors.New("kvm: permission denied")
	// ErrAPIVersion: KVM_GET_API_VERSION did not return 12.
	ErrAPIVersion = errors.New("kvm: unsupported API version")
	// ErrClosed: the Device, VM or VCPU was closed. It is fs.ErrClosed,
	// as for an *os.File (and arena's and guestmem's), so errors.Is(err,
	// fs.ErrClosed) serves for every package.
	ErrClosed = fs.ErrClosed
	// ErrUnsupported: the kernel lacks the capability the call needs. It
	// answers errors.Is(err, errors.ErrUnsupported) too.
	ErrUnsupported error = unsupported("kvm: not supported by this kernel")

	// ErrSlotLimit: the slot number is at or beyond the kernel's limit
	// (KVM_CAP_NR_MEMSLOTS), or every slot is in use.
	ErrSlotLimit = errors.New("kvm: memory slot limit reached")
	// ErrSlotOverlap: the guest range overlaps another slot's.
	ErrSlotOverlap = errors.New("kvm: memory slot overlaps another")
	// ErrSlotUnaligned: guest address, size or host address is not a
	// multiple of the page size.
	ErrSlotUnaligned = errors.New("kvm: memory slot not page-aligned")
	// ErrSlotSize: zero size (use DeleteSlot), or a guest range that
	// overflows.
	ErrSlotSize = errors.New("kvm: bad memory slot size")
	// ErrNoSlot: no slot with that number is in use.
	ErrNoSlot = errors.New("kvm: no such memory slot")
	// ErrNotLogging: the slot does not have dirty logging on.
	ErrNotLogging = errors.New("kvm: memory slot has no dirty log")
	// ErrBitmapTooSmall: the caller's dirty bitmap cannot hold one bit per
	// page of the slot.
	ErrBitmapTooSmall = errors.New("kvm: dirty bitmap too small")
	// ErrSlotFlags: a flag combination KVM refuses, or a flag the kernel
	// does not offer (read-only slots without KVM_CAP_READONLY_MEM).
	ErrSlotFlags = errors.New("kvm: bad memory slot flags")

	// ErrDirtyRingSize: a dirty ring size that is not a power of two, not
	// a multiple of the page size, above the kernel's maximum, or below
	// the entries the kernel reserves.
	ErrDirtyRingSize = errors.New("kvm: bad dirty ring size")
	// ErrVCPUExists: the call must come before the VM's first vCPU is
	// created (KVM refuses to add a dirty ring to a VM with vCPUs).
	ErrVCPUExists = errors.New("kvm: the VM already has a vCPU")
	// ErrDirtyLogMode: the call conflicts with the VM's dirty-log mode: a
	// dirty ring enabled twice, or together with manual dirty-log
	// protect, or ClearDirtyLog on a VM that logs into dirty rings.
	ErrDirtyLogMode = errors.New("kvm: not possible in the VM's dirty-log mode")
	// ErrDirtyRingEntry: a dirty ring held entries naming no page of a
	// dirty-logged slot in the table; they were dropped. Returned wrapped
	// in a *DirtyRingEntryError.
	ErrDirtyRingEntry = errors.New("kvm: dirty ring entry names no logged page")

	// ErrMemoryFault: KVM_RUN failed because the host memory behind a guest
	// address could not be faulted in (unmapped, PROT_NONE, or a truncated
	// file). Returned wrapped in a *MemoryFaultError.
	ErrMemoryFault = errors.New("kvm: guest memory fault")
)

// SlotError reports a memory slot operation the slot table refused, or the
// kernel failed.
type SlotError struct {
	Op   string // "SetSlot", "DeleteSlot", "GetDirtyLog", ...
	Slot uint32 // the slot number the operation was given
	Err  error  // the cause: a sentinel of this package or an *os.SyscallError
}

// Error says which operation on which slot failed, and why.
func (e *SlotError) Error() string { return fmt.Sprintf("kvm: %s slot %d: %v", e.Op, e.Slot, e.Err) }

// Unwrap returns the cause.
func (e *SlotError) Unwrap() error { return e.Err }

// MemoryFaultError is returned by VCPU.Run when the guest touched slot
// memory whose host mapping cannot be faulted in (see VCPU.Run for the two
// ways KVM reports it). It wraps ErrMemoryFault, and the KVM_RUN errno when
// there is one.
type MemoryFaultError struct {
	GPA     uint64 // guest-physical address of the access, when Known
	Size    uint64 // bytes from GPA the fault covers, when Known
	Known   bool   // GPA and Size are known (always when MMIO)
	Private bool   // a private (guest_memfd) access: KVM_MEMORY_EXIT_FLAG_PRIVATE
	// MMIO says KVM reported the fault as an MMIO exit at an address a slot
	// covers: what its instruction emulator does when it cannot reach the
	// host memory. Write and Slot are then set too.
	MMIO  bool
	Write bool   // the access was a write (only known when MMIO)
	Slot  uint32 // the slot holding GPA (only when MMIO)
	Err   error  // the errno from KVM_RUN (EFAULT or EHWPOISON); nil when MMIO
}

// Error names the guest address when it is known.
func (e *MemoryFaultError) Error() string {
	switch {
	case e.MMIO:
		dir := "read"
		if e.Write {
			dir = "write"
		}
		return fmt.Sprintf("kvm: guest memory fault: %s of %d bytes at guest address %#x in slot %d: the host "+
			"mapping behind it is not accessible (KVM's instruction emulator reported it as an MMIO exit)", dir,
			e.Size, e.GPA, e.Slot)
	case e.Known:
		return fmt.Sprintf("kvm: guest memory fault at guest address %#x (+%#x): host mapping not accessible: %v",
			e.GPA, e.Size, e.Err)
	}
	return fmt.Sprintf("kvm: guest memory fault (guest address not reported by this kernel): %v", e.Err)
}

// Unwrap returns ErrMemoryFault and the errno, if any.
func (e *MemoryFaultError) Unwrap() []error {
	if e.Err == nil {
		return []error{ErrMemoryFault}
	}
	return []error{ErrMemoryFault, e.Err}
}

// ioctlErr names the ioctl in an errno.
func ioctlErr(name string, err error) error {
	if err == nil {
		return nil
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return os.NewSyscallError(name, errno)
	}
	return fmt.Errorf("%s: %w", name, err)
}

// What was closed, for errors that wrap ErrClosed.
var (
	errDeviceClosed = fmt.Errorf("the KVM device is closed: %w", ErrClosed)
	errVMClosed     = fmt.Errorf("the VM is closed: %w", ErrClosed)
	errVCPUClosed   = fmt.Errorf("the vCPU is closed: %w", ErrClosed)
)

// unsupported is a sentinel that also matches errors.ErrUnsupported.
type unsupported string

func (u unsupported) Error() string { return string(u) }

// Is reports whether target is errors.ErrUnsupported.
func (u unsupported) Is(target error) bool { return target == errors.ErrUnsupported }
