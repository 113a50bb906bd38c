package kvm

import (
	"testing"
	"unsafe"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
)

// hostAddr returns the address of b's first byte, for handing to the
// kernel as a slot's host memory.
func hostAddr(b []byte) uintptr {
	// Safety: the address is only passed to KVM as a number, never
	// dereferenced in Go; b is an mmap'd region the caller keeps mapped.
	return uintptr(unsafe.Pointer(&b[0]))
}

// TestIoctlLayouts checks the argument structures against the sizes of
// their C counterparts in include/uapi/linux/kvm.h (x86-64): a wrong size
// would change the ioctl number, and a wrong layout would pass garbage.
func TestIoctlLayouts(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		// Safety: Sizeof and Offsetof only measure types; nothing is accessed.
		{"kvm_userspace_memory_region", unsafe.Sizeof(userMemoryRegion{}), 32},
		{"kvm_userspace_memory_region2", unsafe.Sizeof(userMemoryRegion2{}), 160},
		{"kvm_userspace_memory_region2.guest_memfd", unsafe.Offsetof(userMemoryRegion2{}.guestMemfd), 40},
		{"kvm_dirty_log", unsafe.Sizeof(dirtyLog{}), 16},
		// Safety: as above, measuring only.
		{"kvm_dirty_log.dirty_bitmap", unsafe.Offsetof(dirtyLog{}.bitmap), 8},
		{"kvm_clear_dirty_log", unsafe.Sizeof(clearDirtyLog{}), 24},
		{"kvm_clear_dirty_log.dirty_bitmap", unsafe.Offsetof(clearDirtyLog{}.bitmap), 16},
		{"kvm_enable_cap", unsafe.Sizeof(enableCap{}), 104},
		{"kvm_create_guest_memfd", unsafe.Sizeof(createGuestMemfdArgs{}), 64},
		// Safety: as above, measuring only.
		{"kvm_userspace_memory_region2.guest_memfd_offset", unsafe.Offsetof(userMemoryRegion2{}.guestMemfdOffset), 32},
		// Safety: as above, measuring only. The number is _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd).
		{"KVM_CREATE_GUEST_MEMFD", gokvm.IIOWR(nrCreateGuestMemfd, unsafe.Sizeof(createGuestMemfdArgs{})), 0xC040AED4},
		// The register types: TestRegsLayout (amd64).
		{"kvm_cpuid_entry2", unsafe.Sizeof(cpuidEntry2{}), 40},
		// Safety: as above, measuring only.
		{"kvm_cpuid2.entries", unsafe.Offsetof(cpuid2{}.entries), 8},
	} {
		if c.got != c.want {
			t.Errorf("%s: %d bytes, want %d", c.name, c.got, c.want)
		}
	}
}
