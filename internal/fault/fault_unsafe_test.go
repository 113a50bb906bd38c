package fault

import "unsafe"

// addrOf is the address of b's first byte.
func addrOf(b []byte) uintptr {
	// Safety: only the address is taken, to compare with a fault's; nothing
	// is dereferenced through it.
	return uintptr(unsafe.Pointer(&b[0]))
}
