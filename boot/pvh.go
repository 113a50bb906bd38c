//go:build amd64

package boot

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"io"
	"slices"

	"github.com/gmem-vmm/gmem/guestmem"
)

const (
	elfMagic = "\x7fELF"
	// xenPhys32Entry is XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h):
	// the physical address of the 32-bit PVH entry point.
	xenPhys32Entry = 18
	// startInfoMagic is XEN_HVM_START_MAGIC_VALUE ("xEn3" with the E's
	// top bit set), and startInfoVersion the version with a memory map.
	startInfoMagic   = 0x336ec578
	startInfoVersion = 1
	startInfoSize    = 56
	memmapEntrySize  = 24
	maxNoteSegment   = 1 << 20 // a PT_NOTE larger than this is not a kernel's
	maxProgs         = 1 << 10
)

// Segment is one PT_LOAD segment of an ELF kernel.
type Segment struct {
	Offset   int64                 // where its bytes start in the file
	GPA      guestmem.GuestAddress // p_paddr: where they go in guest memory
	FileSize uint64                // bytes in the file
	MemSize  uint64                // bytes in memory; the rest past FileSize is zeroed
}

// Vmlinux is a parsed and checked ELF kernel with a PVH entry point.
type Vmlinux struct {
	Segments []Segment // the PT_LOAD segments with a non-zero MemSize, in file order
	// PVHEntry is the 32-bit entry point of XEN_ELFNOTE_PHYS32_ENTRY.
	PVHEntry uint32
	// NoteOffset is the file offset of the entry note's descriptor.
	NoteOffset int64
}

// Extent returns the memory the kernel's segments occupy, from the lowest
// to the end of the highest.
func (v *Vmlinux) Extent() guestmem.Span {
	lo, hi := v.Segments[0].GPA, v.Segments[0].GPA
	for _, s := range v.Segments {
		lo, hi = min(lo, s.GPA), max(hi, s.GPA+guestmem.GuestAddress(s.MemSize))
	}
	return guestmem.Span{GPA: lo, Size: uint64(hi - lo)}
}

// ParseVmlinux reads and checks an ELF kernel for PVH: a little-endian
// ELFCLASS64 x86-64 file whose PT_NOTE segments hold the
// XEN_ELFNOTE_PHYS32_ENTRY note ("Xen", type 18, a 4- or 8-byte address
// below 4 GiB inside a PT_LOAD segment), with PT_LOAD segments that do not
// overlap, are no larger in the file than in memory, and lie within the
// file. Section headers are not read.
func ParseVmlinux(r io.ReaderAt) (*Vmlinux, error) {
	const img = "vmlinux"
	var hb [64]byte
	n, err := r.ReadAt(hb[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, imageErr(img, 0, err, "reading the ELF header")
	}
	if n < 4 || string(hb[:4]) != elfMagic {
		return nil, imageErr(img, 0, ErrBadMagic, "no ELF magic")
	}
	if n < len(hb) {
		return nil, imageErr(img, int64(n), ErrTruncated, "ELF header of %d bytes", n)
	}
	var h elf.Header64
	if err := binary.Read(bytes.NewReader(hb[:]), binary.LittleEndian, &h); err != nil {
		return nil, imageErr(img, 0, err, "decoding the ELF header")
	}
	class, data, mach := elf.Class(h.Ident[elf.EI_CLASS]), elf.Data(h.Ident[elf.EI_DATA]), elf.Machine(h.Machine)
	if class != elf.ELFCLASS64 || data != elf.ELFDATA2LSB || mach != elf.EM_X86_64 {
		return nil, imageErr(img, elf.EI_CLASS, ErrNot64Bit, "%v %v %v, want ELFCLASS64 ELFDATA2LSB EM_X86_64", class, data, mach)
	}
	if h.Phentsize != 56 || h.Phnum == 0 || h.Phnum > maxProgs {
		return nil, imageErr(img, 0x36, ErrBadHeader, "%d program headers of %d bytes", h.Phnum, h.Phentsize)
	}
	if h.Phoff > 1<<40 {
		return nil, imageErr(img, 0x20, ErrBadHeader, "program headers at %#x", h.Phoff)
	}
	ph := make([]byte, int(h.Phnum)*56)
	if _, err := r.ReadAt(ph, int64(h.Phoff)); err != nil {
		return nil, imageErr(img, int64(h.Phoff), wrapCause(ErrTruncated, err), "%d program headers", h.Phnum)
	}
	progs := make([]elf.Prog64, h.Phnum)
	if err := binary.Read(bytes.NewReader(ph), binary.LittleEndian, progs); err != nil {
		return nil, imageErr(img, int64(h.Phoff), err, "decoding the program headers")
	}
	v := &Vmlinux{}
	found := false
	for i, p := range progs {
		at := int64(h.Phoff) + int64(i)*56
		switch elf.ProgType(p.Type) {
		case elf.PT_LOAD:
			if p.Memsz == 0 {
				continue
			}
			switch {
			case p.Filesz > p.Memsz:
				return nil, imageErr(img, at, ErrBadHeader, "program header %d (PT_LOAD): p_filesz %#x > p_memsz %#x", i, p.Filesz, p.Memsz)
			case p.Paddr+p.Memsz < p.Paddr || p.Paddr+p.Memsz > uint64(guestmem.MaxGuestAddress):
				return nil, imageErr(img, at, ErrBadHeader, "program header %d (PT_LOAD): [%#x, +%#x) overflows", i, p.Paddr, p.Memsz)
			}
			if err := probe(r, int64(p.Off), p.Filesz); err != nil {
				return nil, imageErr(img, int64(p.Off), wrapCause(ErrTruncated, err), "program header %d (PT_LOAD) of %#x bytes", i, p.Filesz)
			}
			v.Segments = append(v.Segments, Segment{Offset: int64(p.Off), GPA: guestmem.GuestAddress(p.Paddr), FileSize: p.Filesz, MemSize: p.Memsz})
		case elf.PT_NOTE:
			if found {
				continue
			}
			entry, off, ok, err := pvhNote(r, i, p)
			if err != nil {
				return nil, err
			}
			if ok {
				v.PVHEntry, v.NoteOffset, found = entry, off, true
			}
		}
	}
	if !found {
		return nil, imageErr(img, -1, ErrNoPVHNote, "%d program headers", h.Phnum)
	}
	if len(v.Segments) == 0 {
		return nil, imageErr(img, int64(h.Phoff), ErrBadHeader, "no PT_LOAD segment")
	}
	sorted := slices.Clone(v.Segments)
	slices.SortFunc(sorted, func(a, b Segment) int { return cmpGPA(a.GPA, b.GPA) })
	for k := 1; k < len(sorted); k++ {
		if prev := sorted[k-1]; sorted[k].GPA < prev.GPA+guestmem.GuestAddress(prev.MemSize) {
			return nil, imageErr(img, -1, ErrBadHeader, "PT_LOAD segments [%v, +%#x) and [%v, +%#x) overlap",
				prev.GPA, prev.MemSize, sorted[k].GPA, sorted[k].MemSize)
		}
	}
	inside := false
	for _, s := range v.Segments {
		if e := guestmem.GuestAddress(v.PVHEntry); e >= s.GPA && e < s.GPA+guestmem.GuestAddress(s.FileSize) {
			inside = true
		}
	}
	if !inside {
		return nil, imageErr(img, v.NoteOffset, ErrBadHeader, "PVH entry %#x is outside the loaded segments", v.PVHEntry)
	}
	return v, nil
}

func cmpGPA(a, b guestmem.GuestAddress) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// pvhNote looks for XEN_ELFNOTE_PHYS32_ENTRY in PT_NOTE segment i. Notes
// are padded to 4 bytes, or to 8 in a segment aligned to 8 (as readelf
// reads them). It returns the entry and the file offset of its descriptor.
func pvhNote(r io.ReaderAt, i int, p elf.Prog64) (entry uint32, off int64, ok bool, err error) {
	const img = "vmlinux"
	if p.Filesz > maxNoteSegment {
		return 0, 0, false, imageErr(img, int64(p.Off), ErrBadHeader, "program header %d (PT_NOTE) of %#x bytes", i, p.Filesz)
	}
	b := make([]byte, p.Filesz)
	if _, err := r.ReadAt(b, int64(p.Off)); err != nil {
		return 0, 0, false, imageErr(img, int64(p.Off), wrapCause(ErrTruncated, err), "program header %d (PT_NOTE) of %#x bytes", i, p.Filesz)
	}
	align := uint64(4)
	if p.Align == 8 {
		align = 8
	}
	up := func(n uint64) uint64 { return (n + align - 1) &^ (align - 1) }
	le := binary.LittleEndian
	for at := uint64(0); at+12 <= uint64(len(b)); {
		namesz, descsz, typ := uint64(le.Uint32(b[at:])), uint64(le.Uint32(b[at+4:])), le.Uint32(b[at+8:])
		// Padding is to the alignment from the segment's start (as
		// binutils' ELF_NOTE_DESC_OFFSET has it); for 4 that is the same
		// as padding the name and the descriptor each.
		name := at + 12
		desc := up(name + namesz)
		next := up(desc + descsz)
		if namesz > uint64(len(b)) || descsz > uint64(len(b)) || desc+descsz > uint64(len(b)) {
			return 0, 0, false, imageErr(img, int64(p.Off+at), ErrBadHeader, "a note of program header %d (PT_NOTE) runs past the segment", i)
		}
		if typ == xenPhys32Entry && namesz == 4 && string(b[name:name+4]) == "Xen\x00" {
			var e uint64
			switch descsz {
			case 4:
				e = uint64(le.Uint32(b[desc:]))
			case 8:
				e = le.Uint64(b[desc:])
			default:
				return 0, 0, false, imageErr(img, int64(p.Off+desc), ErrBadHeader, "PVH note descriptor of %d bytes", descsz)
			}
			if e > 0xffffffff {
				return 0, 0, false, imageErr(img, int64(p.Off+desc), ErrBadHeader, "PVH entry %#x above 4 GiB", e)
			}
			return uint32(e), int64(p.Off + desc), true, nil
		}
		at = next
	}
	return 0, 0, false, nil
}

// LoadPVH loads an uncompressed ELF kernel (vmlinux) for PVH boot:
//   - every PT_LOAD segment at its physical address (p_paddr), the part
//     past its file size zeroed, each checked to lie in one usable range
//     of RAM at or above HighMemStart;
//   - the initrd, if any, page-aligned at the highest address it fits
//     below the PCI hole, outside the kernel, as module 0;
//   - the command line at CmdlineAddr;
//   - the memory map of MemoryMap at MemmapAddr, the module list at
//     ModlistAddr, and hvm_start_info (version 1) at StartInfoAddr;
//   - a GDT at GDTAddr.
//
// The returned Entry's registers start the kernel at its PVH entry point
// in 32-bit protected mode with paging off, EBX pointing at
// hvm_start_info. Checks come before writes, as for LoadBzImage.
func LoadPVH(mem *guestmem.Memory, vmlinux io.ReaderAt, opts Options) (*Entry, error) {
	v, err := ParseVmlinux(vmlinux)
	if err != nil {
		return nil, err
	}
	mm, err := bootMap(mem)
	if err != nil {
		return nil, err
	}
	if err := opts.check(); err != nil {
		return nil, err
	}
	if len(opts.Cmdline) > CmdlineMax-1 {
		return nil, placeErr("cmdline", ErrCmdlineTooLong, "%d bytes, the area holds %d", len(opts.Cmdline), CmdlineMax-1)
	}
	for i, s := range v.Segments {
		if err := mm.place(s.GPA, s.MemSize); err != nil {
			return nil, placeErr("vmlinux", err, "PT_LOAD segment %d [%v, +%#x)", i, s.GPA, s.MemSize)
		}
	}
	extent := v.Extent()
	e := &Entry{Protocol: PVH, KernelExtent: extent, Kernel: extent, BootInfo: StartInfoAddr, E820: mm, Vmlinux: v}
	if e.Initrd, err = placeInitrd(mm, opts, PCIHoleStart, extent); err != nil {
		return nil, err
	}
	for _, s := range v.Segments {
		if err := copyKernel(mem, "vmlinux", vmlinux, s.Offset, s.GPA, s.FileSize, s.MemSize); err != nil {
			return nil, err
		}
	}
	if err := loadInitrd(mem, opts, e.Initrd); err != nil {
		return nil, err
	}
	if e.Cmdline, err = writeCmdline(mem, opts.Cmdline); err != nil {
		return nil, err
	}
	if err := write(mem, "PVH memory map", MemmapAddr, memmapBytes(mm)); err != nil {
		return nil, err
	}
	if e.Initrd.Size > 0 {
		if err := write(mem, "PVH module list", ModlistAddr, modlistBytes(e.Initrd)); err != nil {
			return nil, err
		}
	}
	if err := write(mem, "hvm_start_info", StartInfoAddr, startInfoBytes(len(mm), e.Initrd.Size > 0)); err != nil {
		return nil, err
	}
	if err := write(mem, "GDT", GDTAddr, gdtBytes(gdtPVH)); err != nil {
		return nil, err
	}
	e.Regs = pvhRegs(v.PVHEntry)
	e.sregs = pvhSregs()
	return e, nil
}

// startInfoBytes is struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h):
// magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr,
// rsdp_paddr, memmap_paddr, memmap_entries, reserved.
func startInfoBytes(entries int, initrd bool) []byte {
	b := make([]byte, startInfoSize)
	le := binary.LittleEndian
	le.PutUint32(b[0:], startInfoMagic)
	le.PutUint32(b[4:], startInfoVersion)
	if initrd {
		le.PutUint32(b[12:], 1)
		le.PutUint64(b[16:], uint64(ModlistAddr))
	}
	le.PutUint64(b[24:], uint64(CmdlineAddr))
	le.PutUint64(b[40:], uint64(MemmapAddr))
	le.PutUint32(b[48:], uint32(entries))
	return b
}

// modlistBytes is one struct hvm_modlist_entry: paddr, size,
// cmdline_paddr (none), reserved.
func modlistBytes(s guestmem.Span) []byte {
	b := make([]byte, 32)
	binary.LittleEndian.PutUint64(b[0:], uint64(s.GPA))
	binary.LittleEndian.PutUint64(b[8:], s.Size)
	return b
}

// memmapBytes is the struct hvm_memmap_table_entry array: addr, size,
// type, reserved.
func memmapBytes(mm memMap) []byte {
	b := make([]byte, len(mm)*memmapEntrySize)
	for i, m := range mm {
		o := i * memmapEntrySize
		binary.LittleEndian.PutUint64(b[o:], uint64(m.GPA))
		binary.LittleEndian.PutUint64(b[o+8:], m.Size)
		binary.LittleEndian.PutUint32(b[o+16:], uint32(m.Type))
	}
	return b
}
