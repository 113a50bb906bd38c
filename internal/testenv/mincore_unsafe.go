package testenv

import (
	"os"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ResidentPages asks the kernel (mincore) how many pages of [addr, addr+n)
// are resident, independently of the packages under test. For a file
// mapping, mincore looks the pages up in the file's page cache, so it also
// counts pages this process has not mapped (a guest_memfd page only the
// guest touched, or one fallocate allocated).
func ResidentPages(t testing.TB, addr uintptr, n uint64) int {
	t.Helper()
	ps := uint64(os.Getpagesize())
	vec := make([]byte, (n+ps-1)/ps)
	if len(vec) == 0 {
		return 0
	}
	// Safety: vec is live for the call and holds one byte per page of the
	// range, which is what the kernel writes.
	_, _, e := unix.Syscall(unix.SYS_MINCORE, addr, uintptr(n), uintptr(unsafe.Pointer(&vec[0])))
	if e != 0 {
		t.Fatalf("mincore(%#x, %#x): %v", addr, n, e)
	}
	c := 0
	for _, v := range vec {
		c += int(v & 1)
	}
	return c
}
