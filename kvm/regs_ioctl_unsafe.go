//go:build amd64

package kvm

import (
	"syscall"
	"unsafe"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
)

// The register ioctls' numbers encode the sizes of struct kvm_regs (144
// bytes) and struct kvm_sregs (312), and the kernel copies exactly that many
// bytes to or from the pointer. A Regs or Sregs (or the Segment and
// Descriptor inside it) of any other size fails to compile here: a constant
// index above 0 is out of range, and one below 0 overflows.
//
// Safety: Sizeof only measures the types; nothing is accessed.
func _() {
	var x [1]struct{}
	_ = x[unsafe.Sizeof(Regs{})-144]
	_ = x[unsafe.Sizeof(Sregs{})-312]
	_ = x[unsafe.Sizeof(Segment{})-24]
	_ = x[unsafe.Sizeof(Descriptor{})-16]
}

func getRegs(fd uintptr, r *Regs) error {
	// Safety: r is converted in the Syscall argument list and is a struct
	// kvm_regs, the size the ioctl number encodes, which the kernel fills.
	req := gokvm.IIOR(nrGetRegs, unsafe.Sizeof(*r))
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, req, uintptr(unsafe.Pointer(r)))
	return errnoErr(errno)
}

func setRegs(fd uintptr, r *Regs) error {
	// Safety: as getRegs; the kernel only reads r.
	req := gokvm.IIOW(nrSetRegs, unsafe.Sizeof(*r))
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, req, uintptr(unsafe.Pointer(r)))
	return errnoErr(errno)
}

func getSregs(fd uintptr, r *Sregs) error {
	// Safety: r is converted in the Syscall argument list and is a struct
	// kvm_sregs, the size the ioctl number encodes, which the kernel fills.
	req := gokvm.IIOR(nrGetSregs, unsafe.Sizeof(*r))
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, req, uintptr(unsafe.Pointer(r)))
	return errnoErr(errno)
}

func setSregs(fd uintptr, r *Sregs) error {
	// Safety: as getSregs; the kernel only reads r.
	req := gokvm.IIOW(nrSetSregs, unsafe.Sizeof(*r))
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, req, uintptr(unsafe.Pointer(r)))
	return errnoErr(errno)
}
