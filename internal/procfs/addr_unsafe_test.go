package procfs

import "unsafe"

// unixAddr is the address of a mapping's first byte.
func unixAddr(b []byte) uintptr {
	// Safety: only the address is taken, for a pagemap offset; nothing is
	// dereferenced through it.
	return uintptr(unsafe.Pointer(&b[0]))
}
