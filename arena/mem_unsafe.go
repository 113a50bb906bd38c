package arena

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// This file holds every use of package unsafe in package arena. The memory it
// touches was mmap'd by this package and lies outside the Go heap: the garbage
// collector neither scans nor moves it, so turning its address into a pointer
// is sound for as long as the mapping exists. Callers guarantee that by holding
// the owning Mapping's lock (read or write) across the access and by checking
// the range against the mapping table first; faults that remain possible
// (PROT_NONE, a truncated file) are caught by catchFault. The atomics on
// mapped memory dereference raw addresses in assembly instead
// (atomic_unsafe.go, atomic_amd64.s, atomic_arm64.s), under the same rules.

// pointerAt converts a mapped address into a pointer.
func pointerAt(addr uintptr) unsafe.Pointer {
	// Safety: addr lies in memory this package mapped outside the Go heap
	// (see above). Reinterpreting the uintptr's storage rather than
	// converting it keeps vet's unsafeptr check meaningful for real misuse.
	return *(*unsafe.Pointer)(unsafe.Pointer(&addr))
}

// bytesAt returns the n mapped bytes at addr as a slice. The slice must not
// outlive the lock that keeps the mapping alive.
func bytesAt(addr uintptr, n int) []byte {
	// Safety: [addr, addr+n) was bounds-checked against a live mapping by the
	// caller, which holds the mapping's lock for the slice's whole lifetime.
	return unsafe.Slice((*byte)(pointerAt(addr)), n)
}

// sysMincore fills vec with the residency of the pages of [addr, addr+n).
func sysMincore(addr uintptr, n int64, vec []byte) syscall.Errno {
	// Safety: vec has one byte per page of the range (the caller sized it),
	// and the kernel writes only within it; the Go slice stays live across
	// the call because it is an argument.
	_, _, e := unix.Syscall(unix.SYS_MINCORE, addr, uintptr(n), uintptr(unsafe.Pointer(&vec[0])))
	return e
}
