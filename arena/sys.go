package arena

import (
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// pageSize is the base page size; every offset and size this package accepts
// is a multiple of it (or of a larger hugetlb page size).
var pageSize = int64(os.Getpagesize())

// The raw syscalls below take addresses as uintptr: the memory they name is
// mmap'd outside the Go heap, so the garbage collector never moves or frees it
// and no unsafe.Pointer is needed to pass it to the kernel.

func sysMmap(addr uintptr, length int64, prot Protection, flags, fd int, off int64) (uintptr, syscall.Errno) {
	r, _, e := unix.Syscall6(unix.SYS_MMAP, addr, uintptr(length), uintptr(prot), uintptr(flags), uintptr(fd), uintptr(off))
	return r, e
}

func sysMunmap(addr uintptr, length int64) error {
	if _, _, e := unix.Syscall(unix.SYS_MUNMAP, addr, uintptr(length), 0); e != 0 {
		return os.NewSyscallError("munmap", e)
	}
	return nil
}

func sysMadvise(addr uintptr, length int64, advice int) syscall.Errno {
	_, _, e := unix.Syscall(unix.SYS_MADVISE, addr, uintptr(length), uintptr(advice))
	return e
}

func sysMprotect(addr uintptr, length int64, prot Protection) syscall.Errno {
	_, _, e := unix.Syscall(unix.SYS_MPROTECT, addr, uintptr(length), uintptr(prot))
	return e
}

func sysMlock2(addr uintptr, length int64, flags int) syscall.Errno {
	_, _, e := unix.Syscall(unix.SYS_MLOCK2, addr, uintptr(length), uintptr(flags))
	return e
}

func sysMunlock(addr uintptr, length int64) syscall.Errno {
	_, _, e := unix.Syscall(unix.SYS_MUNLOCK, addr, uintptr(length), 0)
	return e
}

func sysMsync(addr uintptr, length int64, flags int) syscall.Errno {
	_, _, e := unix.Syscall(unix.SYS_MSYNC, addr, uintptr(length), uintptr(flags))
	return e
}

// adviceName names madvise advice values in error messages.
func adviceName(advice int) string {
	switch advice {
	case unix.MADV_WILLNEED:
		return "madvise(MADV_WILLNEED)"
	case unix.MADV_DONTNEED:
		return "madvise(MADV_DONTNEED)"
	case unix.MADV_REMOVE:
		return "madvise(MADV_REMOVE)"
	case unix.MADV_HUGEPAGE:
		return "madvise(MADV_HUGEPAGE)"
	case unix.MADV_NOHUGEPAGE:
		return "madvise(MADV_NOHUGEPAGE)"
	case unix.MADV_DONTFORK:
		return "madvise(MADV_DONTFORK)"
	case unix.MADV_DONTDUMP:
		return "madvise(MADV_DONTDUMP)"
	case unix.MADV_POPULATE_READ:
		return "madvise(MADV_POPULATE_READ)"
	case unix.MADV_POPULATE_WRITE:
		return "madvise(MADV_POPULATE_WRITE)"
	case unix.MADV_MERGEABLE:
		return "madvise(MADV_MERGEABLE)"
	case unix.MADV_UNMERGEABLE:
		return "madvise(MADV_UNMERGEABLE)"
	}
	return "madvise"
}
