//go:build amd64 || arm64

package arena

// The atomics on mapped memory are written in assembly (atomic_amd64.s,
// atomic_arm64.s), not with sync/atomic. Under the race detector every
// sync/atomic operation runs inside the detector's C runtime, on the system
// stack, where the Go runtime cannot turn a memory fault into a panic: a
// store into a read-only page killed the process there even with
// debug.SetPanicOnFault set. Assembly functions are Go text running on the
// goroutine's stack, so a fault in one of them is a panic that catchFault
// recovers, in race and normal builds alike. The race detector does not see
// these accesses; it never tracked memory outside the Go heap anyway.
//
// Each function takes the raw address of a word and dereferences it, which is
// what makes this file unsafe even though it needs no import of package
// unsafe. They have the memory-ordering guarantees of sync/atomic
// (sequentially consistent): on amd64 a plain MOV is an atomic load, and
// stores use XCHG, compare-and-swap and add LOCK CMPXCHG and LOCK XADD; on
// arm64 loads are LDAR, stores STLR, and compare-and-swap and add are
// LDAXR/STLXR retry loops, which need no LSE atomics.

// atomicLoad32 atomically loads the 32-bit word at addr.
//
// Safety: addr must be 4-byte aligned and lie in memory this package mapped,
// kept mapped by the caller's lock on the owning Mapping; a fault there
// (PROT_NONE, SIGBUS) is left to the caller's catchFault.
func atomicLoad32(addr uintptr) uint32

// atomicLoad64 atomically loads the 64-bit word at addr.
//
// Safety: as atomicLoad32, with addr 8-byte aligned.
func atomicLoad64(addr uintptr) uint64

// atomicStore32 atomically stores v into the 32-bit word at addr.
//
// Safety: as atomicLoad32.
func atomicStore32(addr uintptr, v uint32)

// atomicStore64 atomically stores v into the 64-bit word at addr.
//
// Safety: as atomicLoad32, with addr 8-byte aligned.
func atomicStore64(addr uintptr, v uint64)

// atomicCAS32 atomically replaces the 32-bit word at addr with newV if it
// holds old, and reports whether it did. On amd64 the word is written even
// when the comparison fails (so a read-only page faults either way); on arm64
// a failed comparison only reads.
//
// Safety: as atomicLoad32.
func atomicCAS32(addr uintptr, old, newV uint32) bool

// atomicCAS64 is atomicCAS32 for the 64-bit word at addr.
//
// Safety: as atomicLoad32, with addr 8-byte aligned.
func atomicCAS64(addr uintptr, old, newV uint64) bool

// atomicAdd32 atomically adds delta to the 32-bit word at addr and returns
// the new value.
//
// Safety: as atomicLoad32.
func atomicAdd32(addr uintptr, delta uint32) uint32
