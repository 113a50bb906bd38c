package kvm

import (
	"sync/atomic"
	"unsafe"
)

// The flags word of a dirty ring entry is shared with the kernel, which
// writes it from the vCPU's thread while the VMM reads it: it is accessed
// only atomically, as the ring's acquire/release protocol needs.

// flagsPtr returns the flags word of entry i (i < r.n).
func (r *dirtyRing) flagsPtr(i uint32) *uint32 {
	b := r.mem[int(i)*gfnSize:][:gfnSize]
	// Safety: b holds one whole struct kvm_dirty_gfn, whose first field is
	// the u32 flags; entries are 16 bytes apart from a page-aligned start
	// (or, in tests, an allocation at least 8-aligned), so the word is
	// 4-aligned. r.mem stays mapped while r is in use (unmapDirtyRing drops
	// r under the ring lock every access happens under).
	return (*uint32)(unsafe.Pointer(&b[0]))
}

// loadFlags reads entry i's flags with (at least) acquire semantics.
func (r *dirtyRing) loadFlags(i uint32) uint32 { return atomic.LoadUint32(r.flagsPtr(i)) }

// storeFlags writes entry i's flags with (at least) release semantics.
func (r *dirtyRing) storeFlags(i, v uint32) { atomic.StoreUint32(r.flagsPtr(i), v) }
