//go:build amd64

package boot

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/kvm"
)

// Options are what a boot is given besides the kernel.
type Options struct {
	// Cmdline is the kernel command line, without a NUL. It may be empty.
	Cmdline string
	// Initrd is the initial ramdisk, InitrdSize bytes from offset 0, or
	// nil for none.
	Initrd io.ReaderAt
	// InitrdSize is the initrd's size in bytes: positive with an Initrd,
	// 0 without.
	InitrdSize int64
}

func (o Options) check() error {
	switch {
	case bytes.IndexByte([]byte(o.Cmdline), 0) >= 0:
		return fmt.Errorf("boot: %w: the command line holds a NUL byte at %d", ErrBadOption, bytes.IndexByte([]byte(o.Cmdline), 0))
	case o.Initrd != nil && o.InitrdSize <= 0:
		return fmt.Errorf("boot: %w: InitrdSize %d with an Initrd", ErrBadOption, o.InitrdSize)
	case o.Initrd == nil && o.InitrdSize != 0:
		return fmt.Errorf("boot: %w: InitrdSize %d without an Initrd", ErrBadOption, o.InitrdSize)
	}
	return nil
}

// Protocol is the way the kernel is entered.
type Protocol int

// The protocols.
const (
	// LinuxBoot64 is the Linux/x86 64-bit boot protocol: a bzImage entered
	// at its 64-bit entry point in long mode with an identity map, RSI
	// pointing at boot_params.
	LinuxBoot64 Protocol = iota + 1
	// PVH is Xen's x86/HVM direct boot ABI: an ELF entered at its
	// XEN_ELFNOTE_PHYS32_ENTRY in 32-bit protected mode with paging off,
	// EBX pointing at hvm_start_info.
	PVH
)

// String names the protocol.
func (p Protocol) String() string {
	switch p {
	case LinuxBoot64:
		return "linux-64bit"
	case PVH:
		return "pvh"
	}
	return fmt.Sprintf("protocol(%d)", int(p))
}

// Entry is a loaded kernel: the boot vCPU's registers, and where everything
// went in guest memory.
type Entry struct {
	Protocol Protocol
	// Regs are the boot vCPU's general-purpose registers: RIP at the entry
	// point, RFLAGS with interrupts off, and RSI (LinuxBoot64, with RSP
	// and RBP at StackTop) or RBX (PVH) at BootInfo. Give them to
	// kvm.VCPU.SetRegs.
	Regs kvm.Regs
	// Kernel is where the kernel's bytes were written: the protected-mode
	// kernel of a bzImage; from the lowest PT_LOAD segment to the end of
	// the highest, for a vmlinux.
	Kernel guestmem.Span
	// KernelExtent is all the memory the kernel needs before it reads the
	// memory map: for a bzImage, its image and init_size from its runtime
	// start; for a vmlinux, its segments with their zero-filled tails.
	// The initrd is placed outside it.
	KernelExtent guestmem.Span
	// Initrd is where the initrd was written; Size is 0 without one.
	Initrd guestmem.Span
	// Cmdline is where the command line was written, its NUL included.
	Cmdline guestmem.Span
	// BootInfo is the address of boot_params (LinuxBoot64) or
	// hvm_start_info (PVH).
	BootInfo guestmem.GuestAddress
	// E820 is the memory map given to the kernel (MemoryMap of the
	// memory's regions).
	E820 []E820Entry
	// IdentityMap is the guest-physical range the LinuxBoot64 page tables
	// map to itself, from 0; Size is 0 for PVH, which starts with paging
	// off.
	IdentityMap guestmem.Span
	// BzImage is the parsed image for LinuxBoot64, nil for PVH.
	BzImage *BzImage
	// Vmlinux is the parsed image for PVH, nil for LinuxBoot64.
	Vmlinux *Vmlinux

	sregs kvm.Sregs // the fields Sregs sets
}

// Sregs returns base, the vCPU's special registers as KVM_GET_SREGS gave
// them, with the segments, descriptor tables, control registers and EFER
// the protocol requires. CR2, CR8, the APIC base and a pending interrupt
// are kept from base. Give the result to kvm.VCPU.SetSregs.
func (e *Entry) Sregs(base kvm.Sregs) kvm.Sregs {
	s := e.sregs
	s.CR2, s.CR8, s.ApicBase, s.InterruptBitmap = base.CR2, base.CR8, base.ApicBase, base.InterruptBitmap
	return s
}

// Load loads kernel with LoadPVH if it is an ELF file and with LoadBzImage
// if it has a bzImage's setup header; anything else is ErrBadMagic.
func Load(mem *guestmem.Memory, kernel io.ReaderAt, opts Options) (*Entry, error) {
	var head [offHeader + 4]byte
	n, err := kernel.ReadAt(head[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, imageErr("kernel", 0, err, "reading the first %d bytes", len(head))
	}
	switch {
	case n >= 4 && string(head[:4]) == elfMagic:
		return LoadPVH(mem, kernel, opts)
	case n == len(head) && string(head[offHeader:]) == "HdrS":
		return LoadBzImage(mem, kernel, opts)
	}
	return nil, imageErr("kernel", 0, ErrBadMagic, "neither an ELF file nor a bzImage (%d bytes read)", n)
}

// bootMap returns the memory map of mem, checking that the boot data area
// is usable RAM.
func bootMap(mem *guestmem.Memory) (memMap, error) {
	m, err := MemoryMap(layoutOf(mem))
	if err != nil {
		return nil, err
	}
	mm := memMap(m)
	if _, ok := mm.usable(0, uint64(bootDataEnd)); !ok {
		return nil, fmt.Errorf("boot: %w: the boot data [0, %v) must be usable RAM", ErrLayout, bootDataEnd)
	}
	return mm, nil
}

// placeInitrd chooses where the initrd goes: page-aligned, at the highest
// address it fits in usable RAM below limit and outside the kernel's
// extent. Without an initrd it returns a zero Span.
func placeInitrd(mm memMap, opts Options, limit guestmem.GuestAddress, kernel guestmem.Span) (guestmem.Span, error) {
	if opts.Initrd == nil {
		return guestmem.Span{}, nil
	}
	n := uint64(opts.InitrdSize)
	if err := probe(opts.Initrd, 0, n); err != nil {
		return guestmem.Span{}, imageErr("initrd", 0, wrapCause(ErrTruncated, err), "initrd of %#x bytes", n)
	}
	a, ok := mm.highest(n, limit, kernel)
	if !ok {
		return guestmem.Span{}, placeErr("initrd", ErrNoRoom, "initrd of %#x bytes below %v outside the kernel [%v, +%#x)",
			n, limit, kernel.GPA, kernel.Size)
	}
	return guestmem.Span{GPA: a, Size: n}, nil
}

// loadInitrd copies the initrd to s.
func loadInitrd(mem *guestmem.Memory, opts Options, s guestmem.Span) error {
	if opts.Initrd == nil {
		return nil
	}
	_, err := mem.CopyFrom(s.GPA, io.NewSectionReader(opts.Initrd, 0, int64(s.Size)), s.Size)
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return imageErr("initrd", 0, wrapCause(ErrTruncated, err), "initrd of %#x bytes", s.Size)
	}
	if err != nil {
		return fmt.Errorf("boot: writing the initrd to [%v, +%#x): %w", s.GPA, s.Size, err)
	}
	return nil
}

// copyKernel copies fileSize bytes of image at off to gpa and zeroes the
// rest of memSize.
func copyKernel(mem *guestmem.Memory, image string, r io.ReaderAt, off int64, gpa guestmem.GuestAddress, fileSize, memSize uint64) error {
	_, err := mem.CopyFrom(gpa, io.NewSectionReader(r, off, int64(fileSize)), fileSize)
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return imageErr(image, off, wrapCause(ErrTruncated, err), "%#x bytes for [%v, +%#x)", fileSize, gpa, fileSize)
	}
	if err != nil {
		return fmt.Errorf("boot: writing the kernel to [%v, +%#x): %w", gpa, fileSize, err)
	}
	if memSize > fileSize {
		n := memSize - fileSize
		if _, err := mem.CopyFrom(gpa+guestmem.GuestAddress(fileSize), zeros{}, n); err != nil {
			return fmt.Errorf("boot: zeroing the kernel's [%v, +%#x): %w", gpa+guestmem.GuestAddress(fileSize), n, err)
		}
	}
	return nil
}

// zeros reads as an endless run of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// writeCmdline writes the command line and its NUL at CmdlineAddr.
func writeCmdline(mem *guestmem.Memory, cmdline string) (guestmem.Span, error) {
	b := append([]byte(cmdline), 0)
	if err := write(mem, "command line", CmdlineAddr, b); err != nil {
		return guestmem.Span{}, err
	}
	return guestmem.Span{GPA: CmdlineAddr, Size: uint64(len(b))}, nil
}

// write writes b at a, naming what in an error.
func write(mem *guestmem.Memory, what string, a guestmem.GuestAddress, b []byte) error {
	if _, err := mem.WriteAt(b, int64(a)); err != nil {
		return fmt.Errorf("boot: writing the %s: %w", what, err)
	}
	return nil
}
