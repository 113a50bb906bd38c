//go:build linux

package uffd

import (
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// This file holds every use of package unsafe in package uffd: the ioctl
// argument structs, passed to the kernel by address, and the one Go pointer
// the kernel reads through (UFFDIO_COPY's source). Destination addresses are
// registered memory outside the Go heap, which the kernel validates; they
// stay plain integers and are never dereferenced here.

// The ioctl argument structs, laid out as the kernel's (all fields 8 bytes,
// no padding on the 64-bit targets this package builds for).
type (
	uffdioAPI struct {
		api, features, ioctls uint64
	}
	uffdioRange struct {
		start, len uint64
	}
	uffdioRegister struct {
		rng          uffdioRange
		mode, ioctls uint64
	}
	uffdioCopy struct {
		dst uint64
		// Safety: src is a Go pointer, not an integer, so that the garbage
		// collector keeps the source alive and escape analysis puts it on
		// the heap, where it cannot move while the kernel reads it.
		src       unsafe.Pointer
		len, mode uint64
		copy      int64
	}
	uffdioZeropage struct { // also struct uffdio_poison: same layout
		rng    uffdioRange
		mode   uint64
		result int64
	}
)

// Safety: compile-time checks that the mirrors have the kernel's sizes (an
// unsafe.Pointer is 8 bytes only on 64-bit targets); Sizeof reads nothing.
var (
	_ = [1]struct{}{}[unsafe.Sizeof(uffdioAPI{})-24]
	_ = [1]struct{}{}[unsafe.Sizeof(uffdioRegister{})-32]
	_ = [1]struct{}{}[unsafe.Sizeof(uffdioCopy{})-40]
	_ = [1]struct{}{}[unsafe.Sizeof(uffdioZeropage{})-32]
)

// ioctlAPIArg issues UFFDIO_API.
func ioctlAPIArg(fd int, a *uffdioAPI) syscall.Errno {
	// Safety: a points to a live uffdioAPI of the kernel's layout; the
	// kernel reads and writes only its 24 bytes during the call.
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), ioctlAPI, uintptr(unsafe.Pointer(a)))
	return e
}

// ioctlRegisterArg issues UFFDIO_REGISTER.
func ioctlRegisterArg(fd int, r *uffdioRegister) syscall.Errno {
	// Safety: r points to a live uffdioRegister of the kernel's layout; the
	// kernel reads it and writes back its ioctls field.
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), ioctlRegister, uintptr(unsafe.Pointer(r)))
	return e
}

// ioctlRange issues UFFDIO_UNREGISTER or UFFDIO_WAKE.
func ioctlRange(fd int, req uintptr, r *uffdioRange) syscall.Errno {
	// Safety: r points to a live uffdioRange; the kernel only reads it.
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(r)))
	return e
}

// ioctlCopyArg issues UFFDIO_COPY of len(src) bytes from src to dst.
func ioctlCopyArg(fd int, dst uintptr, src []byte, mode uint64) (copied int64, e syscall.Errno) {
	// Safety: c.src points to src's first byte and c.len is at most
	// len(src), so the kernel reads only src's bytes; src is on the heap
	// (see uffdioCopy) and is kept live until the call returns. The caller
	// checked that src is not empty.
	c := uffdioCopy{dst: uint64(dst), src: unsafe.Pointer(&src[0]), len: uint64(len(src)), mode: mode}
	_, _, e = unix.Syscall(unix.SYS_IOCTL, uintptr(fd), ioctlCopy, uintptr(unsafe.Pointer(&c)))
	runtime.KeepAlive(src)
	return c.copy, e
}

// ioctlFill issues UFFDIO_ZEROPAGE or UFFDIO_POISON on [dst, dst+n).
func ioctlFill(fd int, req uintptr, dst, n uintptr, mode uint64) (done int64, e syscall.Errno) {
	z := uffdioZeropage{rng: uffdioRange{start: uint64(dst), len: uint64(n)}, mode: mode}
	// Safety: z is a live uffdioZeropage (the layout of both ioctls' structs);
	// the kernel reads it and writes back its result field.
	_, _, e = unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&z)))
	return z.result, e
}

// ioctlNewFD issues USERFAULTFD_IOC_NEW on an open /dev/userfaultfd: its
// argument is the new descriptor's flags, not a pointer.
func ioctlNewFD(dev int, flags int) (int, syscall.Errno) {
	fd, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(dev), ioctlNew, uintptr(flags))
	return int(fd), e
}
