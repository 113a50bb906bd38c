package kvm

import (
	"syscall"
	"unsafe"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
)

// This file holds every use of package unsafe in package kvm: ioctls whose
// argument structures hold pointers, and the vCPU's shared kvm_run page.
// Go memory handed to an ioctl is only used by the kernel for the duration
// of the call, and each call keeps the memory alive until it returns with
// runtime.KeepAlive semantics provided by passing the pointer through
// syscall.Syscall (the compiler keeps uintptr(unsafe.Pointer(p)) arguments
// of syscall calls alive).

const (
	ioctlSetUserMemoryRegion2 = 0x49
	ioctlEnableCap            = 0xa3
	ioctlClearDirtyLog        = 0xc0
)

type userMemoryRegion2 struct {
	slot             uint32
	flags            uint32
	guestPhysAddr    uint64
	memorySize       uint64
	userspaceAddr    uint64
	guestMemfdOffset uint64
	guestMemfd       uint32
	_                uint32
	_                [14]uint64
}

func setUserMemoryRegion(vmfd uintptr, v2 bool, slot, flags uint32, gpa, size uint64, uaddr uintptr) error {
	if !v2 {
		r := gokvm.UserspaceMemoryRegion{Slot: slot, Flags: flags, GuestPhysAddr: gpa, MemorySize: size,
			UserspaceAddr: uint64(uaddr)}
		return gokvm.SetUserMemoryRegion(vmfd, &r)
	}
	r := userMemoryRegion2{slot: slot, flags: flags, guestPhysAddr: gpa, memorySize: size, userspaceAddr: uint64(uaddr)}
	// Safety: r is a live Go value of exactly the size the ioctl number
	// encodes; the kernel reads it during the call only.
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, vmfd, gokvm.IIOW(ioctlSetUserMemoryRegion2, unsafe.Sizeof(r)),
		uintptr(unsafe.Pointer(&r)))
	return errnoErr(errno)
}

func errnoErr(e syscall.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}

// getDirtyLog copies the slot's dirty bitmap into bitmap, which must hold
// at least ALIGN(pages, 64)/8 bytes: the kernel copies whole 64-bit words.
func getDirtyLog(vmfd uintptr, slot uint32, bitmap []uint64) error {
	// Safety: bitmap's backing array is live Go memory at least as large as
	// the kernel writes (checked by the caller against the slot's size); it
	// is written during the ioctl only.
	dl := gokvm.DirtyLog{Slot: slot, BitMap: uint64(uintptr(unsafe.Pointer(&bitmap[0])))}
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, vmfd, gokvm.IIOW(0x42, unsafe.Sizeof(dl)),
		uintptr(unsafe.Pointer(&dl)))
	return errnoErr(errno)
}

type clearDirtyLog struct {
	slot      uint32
	numPages  uint32
	firstPage uint64
	bitmap    uint64
}

// clearDirtyLogIoctl re-protects the pages whose bits are set in bitmap,
// which covers numPages pages from firstPage (a multiple of 64).
func clearDirtyLogIoctl(vmfd uintptr, slot uint32, first uint64, num uint32, bitmap []uint64) error {
	// Safety: bitmap holds at least num bits (checked by the caller) and is
	// read by the kernel during the ioctl only.
	c := clearDirtyLog{slot: slot, numPages: num, firstPage: first, bitmap: uint64(uintptr(unsafe.Pointer(&bitmap[0])))}
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, vmfd, gokvm.IIOWR(ioctlClearDirtyLog, unsafe.Sizeof(c)),
		uintptr(unsafe.Pointer(&c)))
	return errnoErr(errno)
}

type enableCap struct {
	cap   uint32
	flags uint32
	args  [4]uint64
	_     [64]uint8
}

func enableCapIoctl(vmfd uintptr, c Cap, args ...uint64) error {
	e := enableCap{cap: uint32(c)}
	copy(e.args[:], args)
	// Safety: e is a live Go value of the size the ioctl number encodes.
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, vmfd, gokvm.IIOW(ioctlEnableCap, unsafe.Sizeof(e)),
		uintptr(unsafe.Pointer(&e)))
	return errnoErr(errno)
}

func getRegs(fd uintptr) (*Regs, error)           { return gokvm.GetRegs(fd) }
func setRegs(fd uintptr, r *Regs) error           { return gokvm.SetRegs(fd, r) }
func getSregs(fd uintptr) (*Sregs, error)         { return gokvm.GetSregs(fd) }
func setSregs(fd uintptr, r *Sregs) error         { return gokvm.SetSregs(fd, r) }
func runIoctl(fd uintptr) error                   { _, err := gokvm.Ioctl(fd, gokvm.IIO(0x80), 0); return err }
func vcpuMmapSize(kvmfd uintptr) (uintptr, error) { return gokvm.GetVCPUMMmapSize(kvmfd) }
