//go:build amd64

package vmm

import (
	"errors"
	"os"
	"syscall"
	"unsafe"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
)

// This file holds every use of package unsafe in package vmm: the ioctls of
// a VM's machine state that neither the kvm package nor gokvm issues safely.
//
// Every argument is a byte buffer laid out as the kernel's structure, and its
// address is converted to uintptr inside the argument list of
// syscall.Syscall itself: the one form for which the compiler keeps the
// buffer alive and in place until the call returns (kvm/ioctl_unsafe.go
// explains why). gokvm's helpers for these ioctls convert the pointer first
// and pass the uintptr through a Go function, which gives no such guarantee
// for a structure on the stack, so they are not used here; gokvm is used for
// the VM's setup (machine.go), whose arguments are numbers, heap buffers and
// CreatePIT2's zeroed configuration.

// Sizes of the kernel structures (include/uapi/linux/kvm.h and
// arch/x86/include/uapi/asm/kvm.h, x86-64). TestIoctlNumbers checks the
// request numbers built from them against <linux/kvm.h>'s.
const (
	sizeFPU         = 416  // struct kvm_fpu
	sizeXSAVE       = 4096 // struct kvm_xsave without its flexible tail
	sizeXCRS        = 392  // struct kvm_xcrs
	sizeMSRsHeader  = 8    // struct kvm_msrs without its entries
	sizeMSREntry    = 16   // struct kvm_msr_entry
	sizeLAPIC       = 1024 // struct kvm_lapic_state
	sizeEvents      = 64   // struct kvm_vcpu_events
	sizeMPState     = 4    // struct kvm_mp_state
	sizeDebugRegs   = 128  // struct kvm_debugregs
	sizeIRQChip     = 520  // struct kvm_irqchip
	sizePIT2        = 112  // struct kvm_pit_state2
	sizeClock       = 48   // struct kvm_clock_data
	sizeIRQLevel    = 8    // struct kvm_irq_level
	sizeTranslation = 24   // struct kvm_translation
)

// The ioctl requests, by their number within KVMIO.
var (
	reqSetIdentityMapAddr = gokvm.IIOW(0x48, 8)
	reqIRQLine            = gokvm.IIOW(0x61, sizeIRQLevel)
	reqGetIRQChip         = gokvm.IIOWR(0x62, sizeIRQChip)
	reqSetIRQChip         = gokvm.IIOR(0x63, sizeIRQChip) // _IOR: a historical quirk the kernel keeps
	reqSetClock           = gokvm.IIOW(0x7b, sizeClock)
	reqGetClock           = gokvm.IIOR(0x7c, sizeClock)
	reqTranslate          = gokvm.IIOWR(0x85, sizeTranslation)
	reqGetMSRs            = gokvm.IIOWR(0x88, sizeMSRsHeader)
	reqSetMSRs            = gokvm.IIOW(0x89, sizeMSRsHeader)
	reqGetFPU             = gokvm.IIOR(0x8c, sizeFPU)
	reqSetFPU             = gokvm.IIOW(0x8d, sizeFPU)
	reqGetLAPIC           = gokvm.IIOR(0x8e, sizeLAPIC)
	reqSetLAPIC           = gokvm.IIOW(0x8f, sizeLAPIC)
	reqGetMPState         = gokvm.IIOR(0x98, sizeMPState)
	reqSetMPState         = gokvm.IIOW(0x99, sizeMPState)
	reqGetPIT2            = gokvm.IIOR(0x9f, sizePIT2)
	reqSetPIT2            = gokvm.IIOW(0xa0, sizePIT2)
	reqGetEvents          = gokvm.IIOR(0x9f, sizeEvents) // the same number as KVM_GET_PIT2, on a vCPU
	reqSetEvents          = gokvm.IIOW(0xa0, sizeEvents)
	reqGetDebugRegs       = gokvm.IIOR(0xa1, sizeDebugRegs)
	reqSetDebugRegs       = gokvm.IIOW(0xa2, sizeDebugRegs)
	reqGetXSAVE           = gokvm.IIOR(0xa4, sizeXSAVE)
	reqSetXSAVE           = gokvm.IIOW(0xa5, sizeXSAVE)
	reqGetXCRS            = gokvm.IIOR(0xa6, sizeXCRS)
	reqSetXCRS            = gokvm.IIOW(0xa7, sizeXCRS)
	reqGetXSAVE2          = gokvm.IIOR(0xcf, sizeXSAVE)
)

// errShortBuffer guards the one rule the kernel cannot check: the buffer
// holds at least the bytes the request says it will copy.
var errShortBuffer = errors.New("vmm: ioctl buffer shorter than its request")

// ioctl issues req on fd with buf as its argument and returns the ioctl's
// result (KVM_GET_MSRS and KVM_SET_MSRS return a count). name is the
// request's name for the error. EINTR is retried.
func ioctl(fd uintptr, name string, req uintptr, buf []byte) (int, error) {
	if size := int(req>>16) & 0x3fff; len(buf) < size || len(buf) == 0 {
		return 0, errShortBuffer
	}
	for {
		// Safety: &buf[0] is converted in the Syscall argument list, so the
		// buffer stays alive and in place for the call; it holds at least
		// the bytes the request encodes (checked above), and for the
		// requests with a flexible tail (MSRs, XSAVE2) the callers size it
		// for the whole structure.
		r, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, req, uintptr(unsafe.Pointer(&buf[0])))
		if errno == syscall.EINTR {
			continue
		}
		if errno != 0 {
			return int(r), os.NewSyscallError(name, errno)
		}
		return int(r), nil
	}
}
