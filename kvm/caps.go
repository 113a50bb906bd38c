package kvm

import (
	"fmt"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
)

// Cap is a KVM capability number (KVM_CAP_*).
type Cap uint32

// The capabilities the memory code asks about.
const (
	CapUserMemory            Cap = 3   // KVM_CAP_USER_MEMORY
	CapNrVCPUs               Cap = 9   // KVM_CAP_NR_VCPUS
	CapNrMemslots            Cap = 10  // KVM_CAP_NR_MEMSLOTS
	CapSyncMMU               Cap = 16  // KVM_CAP_SYNC_MMU
	CapReadonlyMem           Cap = 81  // KVM_CAP_READONLY_MEM
	CapMultiAddressSpace     Cap = 118 // KVM_CAP_MULTI_ADDRESS_SPACE
	CapManualDirtyLogProtect Cap = 168 // KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
	CapDirtyLogRing          Cap = 192 // KVM_CAP_DIRTY_LOG_RING
	CapDirtyLogRingAcqRel    Cap = 223 // KVM_CAP_DIRTY_LOG_RING_ACQ_REL
	CapDirtyLogRingBitmap    Cap = 225 // KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
	CapUserMemory2           Cap = 231 // KVM_CAP_USER_MEMORY2
	CapMemoryFaultInfo       Cap = 232 // KVM_CAP_MEMORY_FAULT_INFO
	CapGuestMemfd            Cap = 234 // KVM_CAP_GUEST_MEMFD
	CapGuestMemfdFlags       Cap = 244 // KVM_CAP_GUEST_MEMFD_FLAGS
)

var capNames = map[Cap]string{
	CapUserMemory: "KVM_CAP_USER_MEMORY", CapNrVCPUs: "KVM_CAP_NR_VCPUS", CapNrMemslots: "KVM_CAP_NR_MEMSLOTS",
	CapSyncMMU: "KVM_CAP_SYNC_MMU", CapReadonlyMem: "KVM_CAP_READONLY_MEM",
	CapMultiAddressSpace: "KVM_CAP_MULTI_ADDRESS_SPACE", CapManualDirtyLogProtect: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
	CapDirtyLogRing: "KVM_CAP_DIRTY_LOG_RING", CapDirtyLogRingAcqRel: "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
	CapUserMemory2: "KVM_CAP_USER_MEMORY2", CapMemoryFaultInfo: "KVM_CAP_MEMORY_FAULT_INFO",
	CapGuestMemfd: "KVM_CAP_GUEST_MEMFD", CapGuestMemfdFlags: "KVM_CAP_GUEST_MEMFD_FLAGS",
	CapDirtyLogRingBitmap: "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
}

// String returns the capability's KVM_CAP_* name, or KVM_CAP(n).
func (c Cap) String() string {
	if n, ok := capNames[c]; ok {
		return n
	}
	return fmt.Sprintf("KVM_CAP(%d)", uint32(c))
}

// Check returns KVM_CHECK_EXTENSION for c on the device: 0 when absent, and
// otherwise 1 or a capability-specific number (slot count, ring size, ...).
func (d *Device) Check(c Cap) (int, error) {
	var n uintptr
	err := d.withFD(func(fd uintptr) error {
		var err error
		n, err = retry(func() (uintptr, error) { return gokvm.CheckExtension(fd, gokvm.Capability(c)) })
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("kvm: checking %v: %w", c, ioctlErr("KVM_CHECK_EXTENSION", err))
	}
	return int(n), nil
}

// Capabilities are the memory-related capabilities of a KVM host.
type Capabilities struct {
	UserMemory  bool // KVM_SET_USER_MEMORY_REGION
	Memslots    int  // usable memory slots per address space
	VCPUs       int  // recommended maximum vCPUs
	ReadonlyMem bool // read-only slots (guest writes exit as MMIO)
	SyncMMU     bool // host mapping changes reach the guest without re-registering
	UserMemory2 bool // KVM_SET_USER_MEMORY_REGION2
	GuestMemfd  bool // KVM_CREATE_GUEST_MEMFD
	// GuestMemfdFlags are the KVM_CREATE_GUEST_MEMFD flags the device
	// reports (KVM_CAP_GUEST_MEMFD_FLAGS): GuestMemfdMmap|GuestMemfdInitShared
	// from Linux 6.18, when the host may map guest_memfd memory. A VM may
	// take fewer (VM.GuestMemfdFlags).
	GuestMemfdFlags   GuestMemfdFlags
	ManualDirtyLog    bool // KVM_CLEAR_DIRTY_LOG (manual dirty-log protect)
	DirtyRingBytes    int  // maximum dirty ring size in bytes; 0 without a dirty ring
	DirtyRingAcqRel   int  // the same for the acquire/release ring, which EnableDirtyRing uses; 0 without
	MultiAddressSpace int  // address spaces (2 on x86 with SMM; 0: the capability is absent, one address space)
	MemoryFaultInfo   bool // KVM_EXIT_MEMORY_FAULT details on a failed fault
}

// Capabilities queries every field of Capabilities.
func (d *Device) Capabilities() (Capabilities, error) {
	var c Capabilities
	for _, q := range []struct {
		cap Cap
		set func(int)
	}{
		{CapUserMemory, func(n int) { c.UserMemory = n > 0 }},
		{CapNrMemslots, func(n int) { c.Memslots = n }},
		{CapNrVCPUs, func(n int) { c.VCPUs = n }},
		{CapReadonlyMem, func(n int) { c.ReadonlyMem = n > 0 }},
		{CapSyncMMU, func(n int) { c.SyncMMU = n > 0 }},
		{CapUserMemory2, func(n int) { c.UserMemory2 = n > 0 }},
		{CapGuestMemfd, func(n int) { c.GuestMemfd = n > 0 }},
		{CapGuestMemfdFlags, func(n int) { c.GuestMemfdFlags = GuestMemfdFlags(max(n, 0)) }},
		{CapManualDirtyLogProtect, func(n int) { c.ManualDirtyLog = n > 0 }},
		{CapDirtyLogRing, func(n int) { c.DirtyRingBytes = n }},
		{CapDirtyLogRingAcqRel, func(n int) { c.DirtyRingAcqRel = n }},
		{CapMultiAddressSpace, func(n int) { c.MultiAddressSpace = n }},
		{CapMemoryFaultInfo, func(n int) { c.MemoryFaultInfo = n > 0 }},
	} {
		n, err := d.Check(q.cap)
		if err != nil {
			return Capabilities{}, err
		}
		q.set(n)
	}
	return c, nil
}
