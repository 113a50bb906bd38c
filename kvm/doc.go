// Package kvm is the KVM layer of gmem: the device, its capabilities, VMs
// with a table of their memory slots, dirty logs, and vCPUs that run and
// report their exits. It is built on github.com/bobuhiro11/gokvm for the
// kernel's structure layouts and ioctl numbers, and issues itself the
// ioctls gokvm lacks (KVM_SET_USER_MEMORY_REGION2, KVM_CLEAR_DIRTY_LOG,
// KVM_RESET_DIRTY_RINGS, KVM_ENABLE_CAP) and those whose arguments point
// into Go memory.
//
// Open opens /dev/kvm and checks the API version; Device.Capabilities says
// what the host offers. Device.CreateVM makes a VM.
//
// A VM keeps a table of its memory slots. VM.SetSlot checks each change
// against the table before the kernel sees it: a slot number beyond the
// kernel's limit is ErrSlotLimit, overlapping guest ranges ErrSlotOverlap,
// unaligned addresses or sizes ErrSlotUnaligned, an empty, oversized or
// overflowing range ErrSlotSize, unknown flags ErrSlotFlags. Changes KVM
// cannot make in place (size, host address, read-only) are made by deleting
// and recreating the slot. VM.DeleteSlot returns only once KVM no longer
// uses the slot's host memory, which may then be unmapped.
//
// VM.CreateGuestMemfd makes guest_memfd memory for the VM
// (KVM_CREATE_GUEST_MEMFD; with GuestMemfdMmap the host maps it too, Linux
// 6.18); a Slot naming it (Slot.GuestMemfd, Slot.GuestMemfdOffset) is
// registered with KVM_SET_USER_MEMORY_REGION2 and KVM_MEM_GUEST_MEMFD. The
// table refuses what KVM does not do with such slots — dirty logging,
// read-only, another VM's guest_memfd — with ErrGuestMemfd, and recreates
// them for any change, since KVM does not change them in place.
//
// Slots created with LogDirtyPages have a dirty log: VM.GetDirtyLog copies
// it into a bitmap of DirtyBitmapWords(pages) words and, unless
// VM.EnableManualDirtyLog was called, resets it; with manual protect,
// VM.ClearDirtyLog resets chosen pages. VM.EnableDirtyRing, before the
// first vCPU, makes KVM log into a ring per vCPU instead; GetDirtyLog then
// harvests the rings (VM.HarvestDirtyRings) and returns the same bitmap, so
// callers need not know which source is in use. VCPU.Run absorbs the exit
// of a full ring by harvesting.
//
// VCPU.Run enters the guest and describes why it came back: an Exit with an
// IOExit or MMIOExit whose Data lies in the vCPU's run page, HLT, shutdown,
// an internal error. Signals that interrupt KVM_RUN are retried, never
// reported. A guest access to slot memory the host cannot provide is a
// *MemoryFaultError (ErrMemoryFault), whether KVM reports it as an EFAULT
// from KVM_RUN or, as its instruction emulator does, as an MMIO exit inside
// a slot. VCPU.Complete finishes an exit the VMM abandons.
//
// Every error wraps a sentinel of this package or an *os.SyscallError
// naming the ioctl; slot operations return a *SlotError. Device, VM and
// VCPU are safe for concurrent use. docs/kvm.md has the details.
package kvm
