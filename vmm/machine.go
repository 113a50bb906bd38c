//go:build amd64

package vmm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/kvm"
)

// Addresses KVM needs for the real-mode TSS (three pages) and the
// identity-map page it uses on Intel hosts, in the PCI hole, which the
// memory map reserves (Firecracker's KVM_TSS_ADDRESS and the page below).
const (
	tssAddr         = 0xfffbd000
	identityMapAddr = 0xfffbc000
)

// Capabilities the machine state depends on (KVM_CAP_*).
const (
	capDebugRegs = 50
	capXSAVE     = 55
	capXCRS      = 56
	capXSAVE2    = 208
)

// machineCaps is what the VM's KVM offers for saving its state.
type machineCaps struct {
	xsaveSize int // bytes of KVM_GET_XSAVE(2); 0 without XSAVE (then KVM_GET_FPU)
	xcrs      bool
	debugRegs bool
}

// newMachine opens KVM and builds the machine around v.mem: the VM, made
// with gokvm on the device's descriptor and set up with the ioctls the kvm
// package does not wrap, then adopted by the kvm package; v.mem registered
// with it; vCPU 0 with its CPUID. Whatever it made is in v for Close.
func (v *VM) newMachine() error {
	dev, err := kvm.Open(v.cfg.kvmPath())
	if err != nil {
		return err
	}
	v.dev = dev
	vmfd, err := createVM(uintptr(dev.FD()))
	if err != nil {
		return err
	}
	if err := setUpVM(vmfd); err != nil {
		unix.Close(int(vmfd))
		return err
	}
	vm, err := dev.Adopt(int(vmfd), kvm.Owned) // vm.Close closes vmfd
	if err != nil {
		unix.Close(int(vmfd))
		return err
	}
	v.kvm, v.vmFD = vm, uintptr(vm.FD())
	v.caps = probeCaps(v.vmFD)
	if err := v.mem.Register(vm); err != nil {
		return fmt.Errorf("registering guest memory: %w", err)
	}
	cpu, err := vm.CreateVCPU(0)
	if err != nil {
		return err
	}
	v.cpu, v.cpuFD = cpu, uintptr(cpu.FD())
	return v.setCPUID()
}

// createVM is gokvm's CreateVM on the device's descriptor: the VM a VMM
// makes itself, which Device.Adopt then wraps.
func createVM(devfd uintptr) (uintptr, error) {
	for {
		fd, err := gokvm.CreateVM(devfd)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return 0, os.NewSyscallError("KVM_CREATE_VM", err)
		}
		return fd, nil
	}
}

// setUpVM gives a new VM what a PC kernel needs that the kvm package does
// not wrap, through gokvm's ioctls on the raw descriptor: the TSS address,
// the in-kernel PIC and IOAPIC (with a LAPIC for each vCPU made later) and
// the PIT. KVM_SET_IDENTITY_MAP_ADDR is issued here rather than with gokvm's
// SetIdentityMapAddr, which hands the kernel a 4-byte value for the 8 bytes
// it reads. (CreatePIT2 passes a zeroed structure from its own stack through
// a uintptr, the form ioctl_unsafe.go avoids; it is one call at setup whose
// only field is flags 0.)
func setUpVM(vmfd uintptr) error {
	if err := gokvm.SetTSSAddr(vmfd, tssAddr); err != nil {
		return os.NewSyscallError("KVM_SET_TSS_ADDR", err)
	}
	b := binary.LittleEndian.AppendUint64(nil, identityMapAddr)
	if _, err := ioctl(vmfd, "KVM_SET_IDENTITY_MAP_ADDR", reqSetIdentityMapAddr, b); err != nil {
		return err
	}
	if err := gokvm.CreateIRQChip(vmfd); err != nil {
		return os.NewSyscallError("KVM_CREATE_IRQCHIP", err)
	}
	if err := gokvm.CreatePIT2(vmfd); err != nil {
		return os.NewSyscallError("KVM_CREATE_PIT2", err)
	}
	return nil
}

func probeCaps(vmfd uintptr) machineCaps {
	check := func(c uint8) int {
		n, err := gokvm.CheckExtension(vmfd, gokvm.Capability(c))
		if err != nil {
			return 0
		}
		return int(n)
	}
	var mc machineCaps
	switch {
	case check(capXSAVE2) > sizeXSAVE:
		mc.xsaveSize = check(capXSAVE2)
	case check(capXSAVE) > 0:
		mc.xsaveSize = sizeXSAVE
	}
	mc.xcrs = check(capXCRS) > 0
	mc.debugRegs = check(capDebugRegs) > 0
	return mc
}

// setCPUID gives vCPU 0 the CPUID table KVM supports here, normalized for
// a VM (normalizeCPUID), with gokvm's KVM_GET_SUPPORTED_CPUID and
// KVM_SET_CPUID2: both pass the kernel a heap buffer, which stays in place.
func (v *VM) setCPUID() error {
	c := &gokvm.CPUID{Nent: maxCPUIDEntries, Entries: make([]gokvm.CPUIDEntry2, maxCPUIDEntries)}
	if err := gokvm.GetSupportedCPUID(uintptr(v.dev.FD()), c); err != nil {
		return os.NewSyscallError("KVM_GET_SUPPORTED_CPUID", err)
	}
	normalizeCPUID(c.Entries, uint32(v.cpu.ID()))
	if err := gokvm.SetCPUID2(v.cpuFD, c); err != nil {
		return os.NewSyscallError("KVM_SET_CPUID2", err)
	}
	return nil
}

// vcpuIoctl and vmIoctl issue an ioctl on the vCPU's or the VM's
// descriptor, unless Close has begun.
func (v *VM) vcpuIoctl(name string, req uintptr, buf []byte) error {
	_, err := v.fdIoctl(true, name, req, buf)
	return err
}

func (v *VM) vmIoctl(name string, req uintptr, buf []byte) error {
	_, err := v.fdIoctl(false, name, req, buf)
	return err
}

func (v *VM) fdIoctl(vcpu bool, name string, req uintptr, buf []byte) (int, error) {
	v.fdMu.RLock()
	defer v.fdMu.RUnlock()
	if v.fdsClosed {
		return 0, fmt.Errorf("vmm: %s: %w", name, ErrClosed)
	}
	fd := v.vmFD
	if vcpu {
		fd = v.cpuFD
	}
	return ioctl(fd, name, req, buf)
}
