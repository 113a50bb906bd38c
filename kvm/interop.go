package kvm

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrNotKVMFD is returned by Adopt and AdoptVCPU for a file descriptor that
// is not a KVM VM (or vCPU): closed, or another kind of file.
var ErrNotKVMFD = errors.New("kvm: not a KVM file descriptor of that kind")

// Ownership says who closes a file descriptor adopted from elsewhere.
type Ownership int

const (
	// Borrowed: the caller keeps its descriptor and closes it when it
	// likes; the package works on a duplicate, which Close closes. The
	// kernel object lives until both are closed.
	Borrowed Ownership = iota
	// Owned: the package takes the descriptor itself, and Close closes
	// it; the caller must not use or close it afterwards.
	Owned
)

// FD returns the device's file descriptor, for ioctls this package does not
// wrap (gokvm's kvm package takes raw descriptors). It is borrowed: it stays
// owned by the Device, valid until Close, after which FD returns -1.
func (d *Device) FD() int {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.f == nil {
		return -1
	}
	return int(d.f.Fd())
}

// FD returns the VM's file descriptor, for the VM ioctls a VMM needs that
// this package does not wrap: KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2,
// KVM_SET_TSS_ADDR, KVM_SET_IDENTITY_MAP_ADDR, KVM_IRQ_LINE, ... (gokvm's
// kvm package has them, taking the raw descriptor). It is borrowed: it
// stays owned by the VM, valid until Close, after which FD returns -1. Do
// not change memory slots through it: the slot table would not know (see
// DeclareSlot for slots made elsewhere).
func (vm *VM) FD() int {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return -1
	}
	return int(vm.f.Fd())
}

// FD returns the vCPU's file descriptor, for the vCPU ioctls this package
// does not wrap: KVM_SET_CPUID2 with a table of the VMM's own, KVM_SET_MSRS,
// KVM_SET_LAPIC, KVM_SET_FPU, ... It is borrowed: it stays owned by the
// VCPU, valid until Close, after which FD returns -1. It waits for a Run in
// progress, as every method does.
func (c *VCPU) FD() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.f == nil {
		return -1
	}
	return int(c.f.Fd())
}

// checkKind reports whether fd is an anonymous KVM inode of kind
// ("kvm-vm" or "kvm-vcpu:N").
func checkKind(fd int, prefix string) error {
	if fd < 0 {
		return fmt.Errorf("%w: fd %d", ErrNotKVMFD, fd)
	}
	link, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return fmt.Errorf("%w: fd %d: %w", ErrNotKVMFD, fd, err)
	}
	if len(link) < len("anon_inode:"+prefix) || link[:len("anon_inode:"+prefix)] != "anon_inode:"+prefix {
		return fmt.Errorf("%w: fd %d is %s, not anon_inode:%s", ErrNotKVMFD, fd, link, prefix)
	}
	return nil
}

// take returns a file for fd: a close-on-exec duplicate when borrowed, fd
// itself when owned.
func take(fd int, own Ownership, name string) (*os.File, error) {
	switch own {
	case Borrowed:
		dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return nil, os.NewSyscallError("fcntl(F_DUPFD_CLOEXEC)", err)
		}
		fd = dup
	case Owned:
		syscall.CloseOnExec(fd)
	default:
		return nil, fmt.Errorf("kvm: ownership %d is neither Borrowed nor Owned", own)
	}
	return os.NewFile(uintptr(fd), name), nil
}

// Adopt wraps a VM made elsewhere — gokvm's kvm.CreateVM, another library,
// a descriptor passed from another process — in a VM, so guest memory can
// be registered with it (guestmem.Register) and its slots, dirty logs and
// vCPUs used through this package. own says who closes vmfd (Borrowed: the
// caller, the VM works on a duplicate; Owned: the VM's Close). A
// descriptor that is not a KVM VM is ErrNotKVMFD. The slot table starts
// empty: declare the slots the VM already has with DeclareSlot, so new
// slots never overlap them. Manual dirty-log protection enabled elsewhere
// is not known to the VM; enable it through EnableManualDirtyLog, or not
// at all.
func (d *Device) Adopt(vmfd int, own Ownership) (*VM, error) {
	if err := checkKind(vmfd, "kvm-vm"); err != nil {
		return nil, fmt.Errorf("kvm: Adopt: %w", err)
	}
	caps, err := d.Capabilities()
	if err != nil {
		return nil, err
	}
	var vm *VM
	err = d.withFD(func(fd uintptr) error {
		dup, err := unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return os.NewSyscallError("fcntl(F_DUPFD_CLOEXEC)", err)
		}
		kvmFD := os.NewFile(uintptr(dup), d.path)
		f, err := take(vmfd, own, "kvm-vm")
		if err != nil {
			kvmFD.Close()
			return err
		}
		vm = newVM(f, kvmFD, caps)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("kvm: Adopt: %w", err)
	}
	return vm, nil
}

// DeclareSlot records in the table a slot the VM already has, made outside
// this package (before Adopt, or by a library that sets slots itself), so
// that AddSlot never picks its number and no slot is allowed to overlap it.
// The kernel is not called. s is checked as SetSlot checks it; a slot of
// that number already in the table is ErrSlotOverlap. DeleteSlot removes a
// declared slot from the kernel and the table as any other.
func (vm *VM) DeclareSlot(s Slot) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return &SlotError{Op: "DeclareSlot", Slot: s.ID, Err: errVMClosed}
	}
	if _, used := vm.slots[s.ID]; used {
		return &SlotError{Op: "DeclareSlot", Slot: s.ID, Err: fmt.Errorf("%w: slot %d is in the table already",
			ErrSlotOverlap, s.ID)}
	}
	if s.GuestMemfd != nil {
		s.Flags |= GuestMemfdSlot
	}
	if err := vm.check(s); err != nil {
		return &SlotError{Op: "DeclareSlot", Slot: s.ID, Err: err}
	}
	vm.insertLocked(s)
	return nil
}

// AdoptVCPU wraps a vCPU of this VM made elsewhere (gokvm's
// kvm.CreateVCPU on the VM's FD) as a VCPU with id, mapping its run page;
// own says who closes fd, as for Adopt. VM.Close closes it with the VM's
// own vCPUs.
func (vm *VM) AdoptVCPU(fd, id int, own Ownership) (*VCPU, error) {
	if err := checkKind(fd, "kvm-vcpu"); err != nil {
		return nil, fmt.Errorf("kvm: AdoptVCPU: %w", err)
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.f == nil {
		return nil, fmt.Errorf("kvm: AdoptVCPU: %w", errVMClosed)
	}
	f, err := take(fd, own, fmt.Sprintf("kvm-vcpu:%d", id))
	if err != nil {
		return nil, fmt.Errorf("kvm: AdoptVCPU: %w", err)
	}
	c, err := vm.wrapVCPU(f, id)
	if err != nil {
		return nil, fmt.Errorf("kvm: AdoptVCPU: %w", err)
	}
	return c, nil
}
