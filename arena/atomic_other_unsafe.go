//go:build !amd64 && !arm64

package arena

import "sync/atomic"

// On architectures without assembly atomics (atomic_amd64.s, atomic_arm64.s)
// the atomics on mapped memory use sync/atomic. A fault in them is recovered
// in normal builds, but under the race detector it kills the process, as
// atomic_unsafe.go explains. The library supports amd64 and arm64; this file
// only keeps the package building elsewhere.

// atomicLoad32 atomically loads the 32-bit word at addr.
func atomicLoad32(addr uintptr) uint32 {
	// Safety: the caller checked that addr is mapped and 4-byte aligned.
	return (*atomic.Uint32)(pointerAt(addr)).Load()
}

// atomicLoad64 atomically loads the 64-bit word at addr.
func atomicLoad64(addr uintptr) uint64 {
	// Safety: the caller checked that addr is mapped and 8-byte aligned.
	return (*atomic.Uint64)(pointerAt(addr)).Load()
}

// atomicStore32 atomically stores v into the 32-bit word at addr.
func atomicStore32(addr uintptr, v uint32) {
	// Safety: the caller checked that addr is mapped and 4-byte aligned.
	(*atomic.Uint32)(pointerAt(addr)).Store(v)
}

// atomicStore64 atomically stores v into the 64-bit word at addr.
func atomicStore64(addr uintptr, v uint64) {
	// Safety: the caller checked that addr is mapped and 8-byte aligned.
	(*atomic.Uint64)(pointerAt(addr)).Store(v)
}

// atomicCAS32 atomically replaces the 32-bit word at addr with newV if it
// holds old, and reports whether it did.
func atomicCAS32(addr uintptr, old, newV uint32) bool {
	// Safety: the caller checked that addr is mapped and 4-byte aligned.
	return (*atomic.Uint32)(pointerAt(addr)).CompareAndSwap(old, newV)
}

// atomicCAS64 is atomicCAS32 for the 64-bit word at addr.
func atomicCAS64(addr uintptr, old, newV uint64) bool {
	// Safety: the caller checked that addr is mapped and 8-byte aligned.
	return (*atomic.Uint64)(pointerAt(addr)).CompareAndSwap(old, newV)
}

// atomicAdd32 atomically adds delta to the 32-bit word at addr and returns
// the new value.
func atomicAdd32(addr uintptr, delta uint32) uint32 {
	// Safety: the caller checked that addr is mapped and 4-byte aligned.
	return (*atomic.Uint32)(pointerAt(addr)).Add(delta)
}
