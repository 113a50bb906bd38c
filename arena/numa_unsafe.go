package arena

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The NUMA system calls take pointers to Go memory (node masks, page and
// status arrays). Each slice is an argument of the function making the call,
// so it stays live across it, and the kernel writes only within the lengths
// passed.

// sysMbind sets the policy of [addr, addr+n): mbind(2). mask may be nil
// (MPOL_DEFAULT).
func sysMbind(addr uintptr, n int64, mode int, mask []uint64, flags int) syscall.Errno {
	// Safety: p stays nil, or points into mask below.
	var p unsafe.Pointer
	maxnode := uintptr(0)
	if len(mask) > 0 {
		// Safety: mask is live for the call; the kernel reads maxnode-1 bits
		// of it (it decrements maxnode first), which fit in len(mask) words.
		p = unsafe.Pointer(&mask[0])
		maxnode = uintptr(len(mask))*64 + 1
	}
	_, _, e := unix.Syscall6(unix.SYS_MBIND, addr, uintptr(n), uintptr(mode), uintptr(p), maxnode, uintptr(flags))
	return e
}

// sysGetMempolicy returns the policy mode of addr (flags MPOL_F_ADDR) or the
// node of its page (MPOL_F_NODE|MPOL_F_ADDR) and fills mask with the
// policy's nodes: get_mempolicy(2).
func sysGetMempolicy(mask []uint64, addr uintptr, flags int) (int, syscall.Errno) {
	var mode int32
	// Safety: mode and mask are live for the call; the kernel writes one
	// int to mode and len(mask)*64 bits to mask, the maxnode passed.
	_, _, e := unix.Syscall6(unix.SYS_GET_MEMPOLICY, uintptr(unsafe.Pointer(&mode)),
		uintptr(unsafe.Pointer(&mask[0])), uintptr(len(mask))*64, addr, uintptr(flags), 0)
	return int(mode), e
}

// sysMovePages asks for the node of each page of pages without moving any
// (move_pages(2) with a nil nodes array) into status.
func sysMovePages(pages []uintptr, status []int32) syscall.Errno {
	// Safety: pages and status have the same length, passed as count; the
	// kernel reads count addresses (which it checks itself; it
	// dereferences none of them from here) and writes count int32s.
	_, _, e := unix.Syscall6(unix.SYS_MOVE_PAGES, 0, uintptr(len(pages)), uintptr(unsafe.Pointer(&pages[0])), 0,
		uintptr(unsafe.Pointer(&status[0])), 0)
	return e
}
