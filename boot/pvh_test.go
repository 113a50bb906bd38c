//go:build amd64

package boot_test

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/bobuhiro11/gokvm/pvh"
	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/boot"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/kvm"
)

// TestTestELFIsAnELF checks the test's ELF builder with debug/elf, so the
// loader is tested on files a standard reader accepts.
func TestTestELFIsAnELF(t *testing.T) {
	spec := defaultELF()
	b := spec.bytes()
	f, err := elf.NewFile(bytes.NewReader(b))
	require.NoError(t, err)
	require.Equal(t, elf.ELFCLASS64, f.Class)
	require.Equal(t, elf.EM_X86_64, f.Machine)
	require.Len(t, f.Progs, 3)
	require.Equal(t, elf.PT_NOTE, f.Progs[0].Type)
	for i, sg := range spec.segs {
		p := f.Progs[1+i]
		require.Equal(t, elf.PT_LOAD, p.Type)
		require.Equal(t, sg.paddr, p.Paddr)
		data := make([]byte, p.Filesz)
		_, err := p.ReadAt(data, 0)
		require.NoError(t, err)
		require.Equal(t, sg.data, data)
	}
	// gokvm's PVH note parser (Firecracker's algorithm) finds the entry too.
	entry, err := pvh.ParsePVHEntry(bytes.NewReader(b), f.Progs[0])
	require.NoError(t, err)
	require.Equal(t, uint32(0x1000040), entry)
}

// TestLoadPVH loads the test ELF with an initrd into 5 GiB of guest memory
// (RAM below and above 4 GiB) and reads back hvm_start_info field by
// field, its memory map against the layout, the module list, the command
// line, the segments (their zero-filled tails over memory that held
// junk), the GDT, and the registers of the PVH ABI.
func TestLoadPVH(t *testing.T) {
	spec := defaultELF()
	img := spec.bytes()
	mem := newMem(t, lowAndHigh())
	// Junk where the second segment's tail goes: the loader must zero it.
	_, err := mem.WriteAt(bytes.Repeat([]byte{0xee}, 0x5000), 0x1200000)
	require.NoError(t, err)
	initrd := patternInitrd(2*4096 + 7)
	const cmdline = "console=ttyS0 earlyprintk=serial"
	e, err := boot.LoadPVH(mem, bytes.NewReader(img), boot.Options{Cmdline: cmdline, Initrd: bytes.NewReader(initrd), InitrdSize: int64(len(initrd))})
	require.NoError(t, err)

	require.Equal(t, boot.PVH, e.Protocol)
	require.Nil(t, e.BzImage)
	require.Equal(t, uint32(0x1000040), e.Vmlinux.PVHEntry)
	require.Equal(t, guestmem.Span{GPA: 0x1000000, Size: 0x205000}, e.KernelExtent)
	require.Equal(t, e.KernelExtent, e.Kernel)
	require.Equal(t, guestmem.Span{GPA: boot.CmdlineAddr, Size: uint64(len(cmdline) + 1)}, e.Cmdline)
	require.Equal(t, boot.StartInfoAddr, e.BootInfo)
	require.Equal(t, guestmem.Span{}, e.IdentityMap, "paging is off")
	// The initrd: as high as it goes below the PCI hole.
	require.Equal(t, guestmem.Span{GPA: (3*kGiB - guestmem.GuestAddress(len(initrd))) &^ 0xfff, Size: uint64(len(initrd))}, e.Initrd)
	checkInitrdRules(t, e, 0xffffffff)
	require.Equal(t, initrd, read(t, mem, e.Initrd.GPA, e.Initrd.Size))

	// Registers: the PVH entry, EBX at hvm_start_info, no interrupts.
	require.Equal(t, kvm.Regs{RIP: 0x1000040, RBX: 0x6000, RFLAGS: 2}, e.Regs)

	// hvm_start_info.
	le := binary.LittleEndian
	si := read(t, mem, boot.StartInfoAddr, 56)
	wantMap, err := boot.MemoryMap(lowAndHigh())
	require.NoError(t, err)
	require.Equal(t, wantMap, e.E820)
	for _, f := range []struct {
		name     string
		off, len int
		want     uint64
	}{
		{"magic", 0, 4, 0x336ec578}, {"version", 4, 4, 1}, {"flags", 8, 4, 0}, {"nr_modules", 12, 4, 1},
		{"modlist_paddr", 16, 8, 0x6040}, {"cmdline_paddr", 24, 8, 0x20000}, {"rsdp_paddr", 32, 8, 0},
		{"memmap_paddr", 40, 8, 0x7000}, {"memmap_entries", 48, 4, uint64(len(wantMap))}, {"reserved", 52, 4, 0},
	} {
		got := uint64(le.Uint32(si[f.off:]))
		if f.len == 8 {
			got = le.Uint64(si[f.off:])
		}
		require.Equalf(t, f.want, got, "hvm_start_info.%s", f.name)
	}
	// The memory map: struct hvm_memmap_table_entry, the layout's.
	mm := read(t, mem, boot.MemmapAddr, uint64(24*len(wantMap)))
	for i, m := range wantMap {
		o := 24 * i
		require.Equal(t, boot.E820Entry{GPA: guestmem.GuestAddress(le.Uint64(mm[o:])), Size: le.Uint64(mm[o+8:]), Type: boot.E820Type(le.Uint32(mm[o+16:]))}, m)
		require.Zero(t, le.Uint32(mm[o+20:]), "reserved")
	}
	require.Equal(t, []boot.E820Entry{
		{GPA: 0, Size: 0x9fc00, Type: boot.E820RAM},
		{GPA: 0x9fc00, Size: 0x60400, Type: boot.E820Reserved},
		{GPA: 0x100000, Size: 3*kGiB - 0x100000, Type: boot.E820RAM},
		{GPA: 3 * kGiB, Size: 1 * kGiB, Type: boot.E820Reserved},
		{GPA: 4 * kGiB, Size: 2 * kGiB, Type: boot.E820RAM},
	}, wantMap)
	// The module list: one hvm_modlist_entry.
	ml := read(t, mem, boot.ModlistAddr, 32)
	require.Equal(t, uint64(e.Initrd.GPA), le.Uint64(ml[0:]))
	require.Equal(t, uint64(len(initrd)), le.Uint64(ml[8:]))
	require.Zero(t, le.Uint64(ml[16:]), "no module command line")
	require.Zero(t, le.Uint64(ml[24:]))
	require.Equal(t, append([]byte(cmdline), 0), read(t, mem, boot.CmdlineAddr, uint64(len(cmdline)+1)))

	// The segments at their physical addresses, the tail zeroed.
	require.Equal(t, spec.segs[0].data, read(t, mem, 0x1000000, 0x3000))
	require.Equal(t, spec.segs[1].data, read(t, mem, 0x1200000, 0x1800))
	require.Equal(t, make([]byte, 0x5000-0x1800), read(t, mem, 0x1201800, 0x5000-0x1800))

	// The GDT is Firecracker's PVH GDT (gokvm's pvh.CreateGDT), and the
	// hidden parts of the registers are what the CPU would load from it.
	gdt := read(t, mem, boot.GDTAddr, 32)
	require.Equal(t, pvh.CreateGDT().Bytes(), gdt)
	base := kvm.Sregs{ApicBase: 0xfee00900, CR0: 0x60000010, CR4: kvm.CR4PAE, EFER: kvm.EFERLME, CR8: 1}
	s := e.Sregs(base)
	code := kvm.Segment{Limit: 0xffffffff, Selector: 0x8, Typ: 11, Present: 1, S: 1, DB: 1, G: 1}
	data := kvm.Segment{Limit: 0xffffffff, Selector: 0x10, Typ: 3, Present: 1, S: 1, DB: 1, G: 1}
	require.Equal(t, code, s.CS, "32-bit code, base 0, limit 4 GiB")
	for _, seg := range []kvm.Segment{s.DS, s.ES, s.FS, s.GS, s.SS} {
		require.Equal(t, data, seg)
	}
	require.Equal(t, kvm.Segment{Base: 0, Limit: 0x67, Selector: 0x18, Typ: 11, Present: 1}, s.TR, "an active 32-bit TSS, base 0, limit 0x67")
	for sel, seg := range map[uint16]kvm.Segment{0x8: s.CS, 0x10: s.DS, 0x18: s.TR} {
		require.Equal(t, seg, fromGokvm(pvh.SegmentFromGDT(le.Uint64(gdt[sel:]), uint8(sel/8))))
	}
	require.Equal(t, kvm.Descriptor{Base: 0x500, Limit: 31}, s.GDT)
	require.Equal(t, uint64(kvm.CR0PE|kvm.CR0ET), s.CR0, "PE set, paging off")
	require.Zero(t, s.CR4)
	require.Zero(t, s.EFER)
	require.Zero(t, s.CR3)
	require.Equal(t, uint64(0xfee00900), s.ApicBase)
	require.Equal(t, uint64(1), s.CR8)
}

// TestLoadPVHWithoutInitrd checks hvm_start_info without modules, and an
// 8-aligned note segment with a 4-byte entry descriptor.
func TestLoadPVHWithoutInitrd(t *testing.T) {
	spec := defaultELF()
	spec.noteAlign = 8
	spec.notes[2] = pvhNote(0x1000100, 4)
	mem := newMem(t, guestmem.X86Layout(64*kMiB))
	e, err := boot.LoadPVH(mem, bytes.NewReader(spec.bytes()), boot.Options{})
	require.NoError(t, err)
	require.Equal(t, uint64(0x1000100), e.Regs.RIP)
	require.Equal(t, guestmem.Span{}, e.Initrd)
	si := read(t, mem, boot.StartInfoAddr, 56)
	le := binary.LittleEndian
	require.Zero(t, le.Uint32(si[12:]), "nr_modules")
	require.Zero(t, le.Uint64(si[16:]), "modlist_paddr")
	require.Equal(t, uint32(4), le.Uint32(si[48:]), "memmap_entries: low RAM, BIOS area, high RAM, PCI hole")
	require.Equal(t, []byte{0}, read(t, mem, boot.CmdlineAddr, 1), "an empty command line")
	require.Equal(t, make([]byte, 32), read(t, mem, boot.ModlistAddr, 32))
}

// TestPVHErrors checks every way a vmlinux can be refused.
func TestPVHErrors(t *testing.T) {
	small := guestmem.X86Layout(64 * kMiB)
	for _, c := range []struct {
		name   string
		edit   func(*elfSpec)
		raw    func([]byte) []byte
		layout guestmem.Layout
		opts   boot.Options
		image  string
		err    error
	}{
		{name: "not an ELF", raw: func(b []byte) []byte { b[0] = 'M'; return b }, err: boot.ErrBadMagic},
		{name: "ELFCLASS32", edit: func(s *elfSpec) { s.class = elf.ELFCLASS32 }, err: boot.ErrNot64Bit},
		{name: "not x86-64", edit: func(s *elfSpec) { s.machine = elf.EM_AARCH64 }, err: boot.ErrNot64Bit},
		{name: "big-endian", raw: func(b []byte) []byte { b[elf.EI_DATA] = byte(elf.ELFDATA2MSB); return b }, err: boot.ErrNot64Bit},
		{name: "no notes", edit: func(s *elfSpec) { s.notes = s.notes[:2] }, err: boot.ErrNoPVHNote},
		{name: "type 18 with another owner", edit: func(s *elfSpec) { s.notes[2].name = "Linux" }, err: boot.ErrNoPVHNote},
		{name: "PVH note descriptor of 2 bytes", edit: func(s *elfSpec) { s.notes[2].desc = []byte{1, 2} }, err: boot.ErrBadHeader},
		{name: "PVH entry above 4 GiB", edit: func(s *elfSpec) { s.notes[2] = pvhNote(5*kGiB, 8) }, err: boot.ErrBadHeader},
		{name: "PVH entry outside the segments", edit: func(s *elfSpec) { s.notes[2] = pvhNote(0x1100000, 8) }, err: boot.ErrBadHeader},
		{name: "PVH entry in a zero-filled tail", edit: func(s *elfSpec) { s.notes[2] = pvhNote(0x1202000, 8) }, err: boot.ErrBadHeader},
		{name: "note runs past its segment", raw: func(b []byte) []byte {
			binary.LittleEndian.PutUint32(b[64+56*3+4:], 1<<20) // the first note's descsz
			return b
		}, err: boot.ErrBadHeader},
		{name: "p_filesz > p_memsz", edit: func(s *elfSpec) { s.segs[1].memsz = 0x100 }, err: boot.ErrBadHeader},
		{name: "overlapping segments", edit: func(s *elfSpec) { s.segs[1].paddr = 0x1002000 }, err: boot.ErrBadHeader},
		{name: "no program headers", raw: func(b []byte) []byte { binary.LittleEndian.PutUint16(b[56:], 0); return b }, err: boot.ErrBadHeader},
		{name: "truncated segment", raw: func(b []byte) []byte { return b[:len(b)-0x1000] }, err: boot.ErrTruncated},
		{name: "truncated program headers", raw: func(b []byte) []byte { return b[:100] }, err: boot.ErrTruncated},
		{name: "truncated ELF header", raw: func(b []byte) []byte { return b[:40] }, err: boot.ErrTruncated},
		{name: "segment in the boot data area", edit: func(s *elfSpec) { s.segs[0].paddr = 0x8000; s.notes[2] = pvhNote(0x8040, 8) }, err: boot.ErrOverlap},
		{name: "segment past the top of RAM", layout: guestmem.X86Layout(18 * kMiB), err: boot.ErrNoRoom},
		{name: "segment across a hole", layout: guestmem.Layout{{GPA: 0, Size: 0x1201000}, {GPA: 32 * kMiB, Size: 32 * kMiB}}, err: boot.ErrHole},
		{name: "segment in the PCI hole", edit: func(s *elfSpec) { s.segs[1].paddr = 3*kGiB + 0x1000 }, layout: lowAndHigh(), err: boot.ErrHole},
		{name: "command line longer than the area", opts: boot.Options{Cmdline: string(bytes.Repeat([]byte("y"), boot.CmdlineMax))}, image: "cmdline", err: boot.ErrCmdlineTooLong},
		{name: "initrd too big", opts: boot.Options{Initrd: bytes.NewReader(make([]byte, 64*kMiB)), InitrdSize: 64 * kMiB}, image: "initrd", err: boot.ErrNoRoom},
		{name: "truncated initrd", opts: boot.Options{Initrd: bytes.NewReader(make([]byte, 10)), InitrdSize: 11}, image: "initrd", err: boot.ErrTruncated},
		{name: "NUL in the command line", opts: boot.Options{Cmdline: "\x00"}, image: "-", err: boot.ErrBadOption},
		{name: "RAM in the PCI hole", layout: guestmem.Layout{{GPA: 0, Size: 64 * kMiB}, {GPA: 4*kGiB - 2*kMiB, Size: 2 * kMiB}}, image: "-", err: boot.ErrLayout},
	} {
		t.Run(c.name, func(t *testing.T) {
			spec := defaultELF()
			if c.edit != nil {
				c.edit(&spec)
			}
			img := spec.bytes()
			if c.raw != nil {
				img = c.raw(img)
			}
			l := c.layout
			if l == nil {
				l = small
			}
			mem := newMem(t, l)
			e, err := boot.LoadPVH(mem, bytes.NewReader(img), c.opts)
			require.Nil(t, e)
			require.ErrorIs(t, err, c.err)
			var ie *boot.ImageError
			switch c.image {
			case "-":
				require.False(t, errors.As(err, &ie), "%v is about the options or layout, not an image", err)
			case "":
				require.ErrorAs(t, err, &ie)
				require.Equal(t, "vmlinux", ie.Image)
			default:
				require.ErrorAs(t, err, &ie)
				require.Equal(t, c.image, ie.Image)
			}
			t.Log(err)
			assertUntouched(t, mem)
		})
	}
}
