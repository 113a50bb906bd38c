package testenv

import (
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// NodeOfPage asks the kernel which NUMA node the page at addr is on
// (get_mempolicy with MPOL_F_NODE|MPOL_F_ADDR), independently of the
// packages under test. The kernel faults the page in to answer.
func NodeOfPage(t testing.TB, addr uintptr) int {
	t.Helper()
	var node int32
	var mask [16]uint64
	const mpolFNode, mpolFAddr = 1, 2
	// Safety: node and mask are live for the call; the kernel writes one int
	// and 1024 bits (the maxnode passed).
	_, _, e := unix.Syscall6(unix.SYS_GET_MEMPOLICY, uintptr(unsafe.Pointer(&node)), uintptr(unsafe.Pointer(&mask[0])),
		1024, addr, mpolFNode|mpolFAddr, 0)
	if e != 0 {
		t.Fatalf("get_mempolicy(MPOL_F_NODE|MPOL_F_ADDR, %#x): %v", addr, e)
	}
	return int(node)
}
