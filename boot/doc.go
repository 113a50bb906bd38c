//go:build amd64

// Package boot loads a Linux kernel into guest memory and says how to start
// the boot vCPU, as rust-vmm's linux-loader does for Firecracker and Cloud
// Hypervisor. Two entry paths:
//
//   - LoadBzImage: a bzImage through the Linux/x86 64-bit boot protocol
//     (protocol 2.12 or later with XLF_KERNEL_64): the protected-mode
//     kernel at its load address, boot_params (the "zero page") with an
//     E820 map, an identity map, and the 64-bit entry at load address +
//     0x200, RSI pointing at boot_params.
//   - LoadPVH: an uncompressed vmlinux ELF through its PVH note
//     (XEN_ELFNOTE_PHYS32_ENTRY): its PT_LOAD segments at their physical
//     addresses, hvm_start_info with a memory map, command line and
//     initrd module, entered in 32-bit protected mode with paging off,
//     EBX pointing at hvm_start_info.
//
// Load picks one by the file's magic. Each returns an *Entry: the
// registers (kvm.Regs, and Entry.Sregs to apply over the vCPU's special
// registers) and where everything went. The memory map comes from the
// memory's layout (MemoryMap): its writable RAM is usable, the BIOS area
// [EBDAStart, HighMemStart) and the PCI hole are reserved. The boot data
// lives in the first 192 KiB of RAM, at Firecracker's addresses (GDTAddr,
// ZeroPageAddr, PML4Addr, CmdlineAddr, ...).
//
// Every write goes through guestmem, and every placement is checked first
// against the memory map: a kernel or initrd that does not fit, crosses a
// hole or overlaps the boot data, a command line the kernel cannot take,
// and a malformed or truncated image are each an *ImageError wrapping a
// sentinel (ErrNoRoom, ErrHole, ErrOverlap, ErrCmdlineTooLong,
// ErrBadMagic, ErrProtocolVersion, ErrNot64Bit, ErrBadHeader,
// ErrTruncated, ErrNoPVHNote), returned before anything is written.
//
// The package builds for every GOARCH (its registers are the kvm
// package's x86-64 types, declared everywhere), but what it loads boots
// only an x86-64 guest.
package boot
