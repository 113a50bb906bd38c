package kvm

import (
	"syscall"
	"unsafe"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
)

// This file holds the ioctls whose arguments are pointers to Go memory, one
// of the package's three uses of package unsafe (regs_ioctl_unsafe.go has
// the register ioctls, dirtyring_unsafe.go the dirty ring's atomic flags).
//
// Each call converts its pointer to uintptr inside the argument list of
// syscall.Syscall itself. That is the one form for which the compiler keeps
// the pointed-to object alive and in place (it is moved to the heap, so a
// stack growth cannot move it) until the call returns. Converting earlier, or
// handing the uintptr to a Go function that calls Syscall later, gives no
// such guarantee, so this package calls gokvm's helpers only for ioctls
// whose argument is a number.
//
// A pointer one structure passes to the kernel inside another (a dirty
// bitmap) is held as an unsafe.Pointer field, never a uintptr: the field
// keeps the bitmap alive and on the heap as long as the structure, which the
// rule above keeps for the duration of the call.

// ioctl numbers (include/uapi/linux/kvm.h), by their nr within KVMIO.
const (
	nrGetSupportedCPUID    = 0x05
	nrSetCPUID2            = 0x90
	nrGetDirtyLog          = 0x42
	nrSetUserMemoryRegion  = 0x46
	nrSetUserMemoryRegion2 = 0x49
	nrRun                  = 0x80
	nrGetRegs              = 0x81
	nrSetRegs              = 0x82
	nrGetSregs             = 0x83
	nrSetSregs             = 0x84
	nrEnableCap            = 0xa3
	nrClearDirtyLog        = 0xc0
	nrResetDirtyRings      = 0xc7
	nrCreateGuestMemfd     = 0xd4
)

func errnoErr(e syscall.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}

// struct kvm_userspace_memory_region.
type userMemoryRegion struct {
	slot          uint32
	flags         uint32
	guestPhysAddr uint64
	memorySize    uint64
	userspaceAddr uint64
}

// struct kvm_userspace_memory_region2.
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

// setUserMemoryRegion sets a slot with KVM_SET_USER_MEMORY_REGION, or
// with KVM_SET_USER_MEMORY_REGION2 when v2 is set, which also carries the
// guest_memfd and the offset in it (gmemFD is ignored without
// KVM_MEM_GUEST_MEMFD in flags).
func setUserMemoryRegion(vmfd uintptr, v2 bool, slot, flags uint32, gpa, size uint64, uaddr uintptr, gmemFD int,
	gmemOff uint64) error {
	if !v2 {
		r := userMemoryRegion{slot: slot, flags: flags, guestPhysAddr: gpa, memorySize: size,
			userspaceAddr: uint64(uaddr)}
		// Safety: &r is converted in the Syscall argument list, so r stays
		// alive and in place during the call; it is exactly the size the
		// ioctl number encodes, and the kernel only reads it.
		req := gokvm.IIOW(nrSetUserMemoryRegion, unsafe.Sizeof(r))
		_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, vmfd, req, uintptr(unsafe.Pointer(&r)))
		return errnoErr(errno)
	}
	r := userMemoryRegion2{slot: slot, flags: flags, guestPhysAddr: gpa, memorySize: size, userspaceAddr: uint64(uaddr)}
	if flags&uint32(GuestMemfdSlot) != 0 {
		r.guestMemfd, r.guestMemfdOffset = uint32(gmemFD), gmemOff
	}
	// Safety: as above, for struct kvm_userspace_memory_region2.
	req := gokvm.IIOW(nrSetUserMemoryRegion2, unsafe.Sizeof(r))
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, vmfd, req, uintptr(unsafe.Pointer(&r)))
	return errnoErr(errno)
}

// struct kvm_create_guest_memfd.
type createGuestMemfdArgs struct {
	size     uint64
	flags    uint64
	reserved [6]uint64
}

// createGuestMemfd is KVM_CREATE_GUEST_MEMFD on the VM fd; it returns the
// new descriptor.
func createGuestMemfd(vmfd uintptr, size, flags uint64) (int, error) {
	a := createGuestMemfdArgs{size: size, flags: flags}
	// Safety: &a is converted in the Syscall argument list, so a stays
	// alive and in place during the call; it is exactly the size the ioctl
	// number encodes (64 bytes), and the kernel only reads it.
	req := gokvm.IIOWR(nrCreateGuestMemfd, unsafe.Sizeof(a))
	for {
		fd, _, errno := syscall.Syscall(syscall.SYS_IOCTL, vmfd, req, uintptr(unsafe.Pointer(&a)))
		if errno == syscall.EINTR {
			continue
		}
		if errno != 0 {
			return -1, errno
		}
		return int(fd), nil
	}
}

// struct kvm_dirty_log.
//
// Safety: bitmap is a pointer field, not a uintptr, so the bitmap it points
// at stays alive and in place as long as the structure does.
type dirtyLog struct {
	slot   uint32
	_      uint32
	bitmap unsafe.Pointer
}

// getDirtyLog copies the slot's dirty bitmap into bitmap, which must hold
// DirtyBitmapWords(pages) words (checked by the caller): the kernel writes
// whole 64-bit words.
func getDirtyLog(vmfd uintptr, slot uint32, bitmap []uint64) error {
	// Safety: dl.bitmap points at bitmap's backing array, which is at least
	// as large as the kernel writes; dl is converted in the Syscall argument
	// list, so dl, and through its pointer field the bitmap, stay alive and
	// in place until the kernel has written it.
	dl := dirtyLog{slot: slot, bitmap: unsafe.Pointer(&bitmap[0])}
	req := gokvm.IIOW(nrGetDirtyLog, unsafe.Sizeof(dl))
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, vmfd, req, uintptr(unsafe.Pointer(&dl)))
	return errnoErr(errno)
}

// struct kvm_clear_dirty_log.
//
// Safety: bitmap is a pointer field, as in dirtyLog.
type clearDirtyLog struct {
	slot      uint32
	numPages  uint32
	firstPage uint64
	bitmap    unsafe.Pointer
}

// clearDirtyLogIoctl re-protects the pages whose bits are set in bitmap,
// which covers numPages pages from firstPage (a multiple of 64).
func clearDirtyLogIoctl(vmfd uintptr, slot uint32, first uint64, num uint32, bitmap []uint64) error {
	// Safety: bitmap holds at least num bits (checked by the caller); it is
	// kept alive and in place through c's pointer field, and c through its
	// conversion in the Syscall argument list. The kernel only reads it.
	c := clearDirtyLog{slot: slot, numPages: num, firstPage: first, bitmap: unsafe.Pointer(&bitmap[0])}
	req := gokvm.IIOWR(nrClearDirtyLog, unsafe.Sizeof(c))
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, vmfd, req, uintptr(unsafe.Pointer(&c)))
	return errnoErr(errno)
}

// struct kvm_enable_cap.
type enableCap struct {
	cap   uint32
	flags uint32
	args  [4]uint64
	_     [64]uint8
}

func enableCapIoctl(vmfd uintptr, c Cap, args ...uint64) error {
	e := enableCap{cap: uint32(c)}
	copy(e.args[:], args)
	// Safety: &e is converted in the Syscall argument list; e is the size
	// the ioctl number encodes, and the kernel only reads it.
	req := gokvm.IIOW(nrEnableCap, unsafe.Sizeof(e))
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, vmfd, req, uintptr(unsafe.Pointer(&e)))
	return errnoErr(errno)
}

// maxCPUIDEntries is KVM_MAX_CPUID_ENTRIES: KVM never reports more.
const maxCPUIDEntries = 256

// struct kvm_cpuid_entry2.
type cpuidEntry2 struct {
	function, index, flags uint32
	eax, ebx, ecx, edx     uint32
	_                      [3]uint32
}

// struct kvm_cpuid2 with room for every entry KVM can report.
type cpuid2 struct {
	nent    uint32
	_       uint32
	entries [maxCPUIDEntries]cpuidEntry2
}

// getSupportedCPUID fills c with the CPUID leaves KVM supports (on the
// /dev/kvm fd); c.nent says how many entries c has room for, and then how
// many KVM wrote.
func getSupportedCPUID(kvmfd uintptr, c *cpuid2) error {
	// Safety: c is converted in the Syscall argument list; the kernel
	// writes at most c.nent entries, which c has room for. The size in the
	// ioctl number is that of the header, struct kvm_cpuid2's fixed part.
	req := gokvm.IIOWR(nrGetSupportedCPUID, unsafe.Offsetof(c.entries))
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, kvmfd, req, uintptr(unsafe.Pointer(c)))
	return errnoErr(errno)
}

// setCPUID2 gives the vCPU the first c.nent entries of c.
func setCPUID2(fd uintptr, c *cpuid2) error {
	// Safety: as getSupportedCPUID; the kernel reads c.nent entries.
	req := gokvm.IIOW(nrSetCPUID2, unsafe.Offsetof(c.entries))
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, req, uintptr(unsafe.Pointer(c)))
	return errnoErr(errno)
}

// runIoctl is KVM_RUN; its argument is 0, and the exit is read from the
// vCPU's run page.
func runIoctl(fd uintptr) error {
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, gokvm.IIO(nrRun), 0)
	return errnoErr(errno)
}

// resetDirtyRingsIoctl is KVM_RESET_DIRTY_RINGS on the VM fd; its argument
// is 0. It returns how many entries the kernel reset, which is not needed.
func resetDirtyRingsIoctl(vmfd uintptr) error {
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, vmfd, gokvm.IIO(nrResetDirtyRings), 0)
	return errnoErr(errno)
}

func vcpuMmapSize(kvmfd uintptr) (uintptr, error) { return gokvm.GetVCPUMMmapSize(kvmfd) }
