//go:build linux

package uffd

import "unsafe"

// addrOf is the address of a mapping's first byte.
func addrOf(b []byte) uintptr {
	// Safety: only the address is taken, to name the mapping to the kernel;
	// nothing is dereferenced through it.
	return uintptr(unsafe.Pointer(&b[0]))
}

// unsafePointerAt turns an address the test chose for a fixed mapping into
// the pointer mmap takes.
func unsafePointerAt(addr uintptr) unsafe.Pointer {
	// Safety: the pointer is only a hint/fixed address handed to mmap; it is
	// never dereferenced, and the address lies outside the Go heap.
	return *(*unsafe.Pointer)(unsafe.Pointer(&addr))
}
