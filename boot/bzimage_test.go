//go:build amd64

package boot_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/bobuhiro11/gokvm/bootparam"
	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"github.com/bobuhiro11/gokvm/pvh"
	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/boot"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/kvm"
)

// TestLoadBzImage loads the test bzImage into 5 GiB of guest memory (3 GiB
// below the PCI hole, 2 GiB above 4 GiB) and reads back everything the
// loader wrote: boot_params field by field (the image's setup header copied
// unchanged but for the five fields a loader sets, the E820 table, zeros
// elsewhere), the kernel bytes at the load address and nothing after them,
// the initrd, the command line, the GDT and the page tables, and the
// registers.
func TestLoadBzImage(t *testing.T) {
	spec := defaultBz(e820Walker(t))
	img := spec.bytes()
	mem := newMem(t, lowAndHigh())
	initrd := patternInitrd(3*4096 + 100)
	const cmdline = "console=ttyS0 root=/dev/vda quiet"
	e, err := boot.LoadBzImage(mem, bytes.NewReader(img), boot.Options{
		Cmdline: cmdline, Initrd: bytes.NewReader(initrd), InitrdSize: int64(len(initrd)),
	})
	require.NoError(t, err)

	setup := spec.setupSize()
	load := guestmem.GuestAddress(16 * kMiB)
	require.Equal(t, boot.LinuxBoot64, e.Protocol)
	require.Equal(t, guestmem.Span{GPA: load, Size: uint64(spec.pmSize)}, e.Kernel)
	require.Equal(t, guestmem.Span{GPA: load, Size: 4 * kMiB}, e.KernelExtent, "init_size from the runtime start")
	require.Equal(t, guestmem.Span{GPA: boot.CmdlineAddr, Size: uint64(len(cmdline) + 1)}, e.Cmdline)
	require.Equal(t, boot.ZeroPageAddr, e.BootInfo)
	require.Equal(t, guestmem.Span{GPA: 0, Size: 6 * kGiB}, e.IdentityMap, "4 GiB at least, up to the top of RAM")
	require.Nil(t, e.Vmlinux)
	require.Equal(t, load+0x200, e.BzImage.Entry64)

	// The memory map is the layout's: usable RAM below the hole and
	// above 4 GiB, the BIOS area and the hole reserved.
	wantMap := []boot.E820Entry{
		{GPA: 0, Size: 0x9fc00, Type: boot.E820RAM},
		{GPA: 0x9fc00, Size: 0x100000 - 0x9fc00, Type: boot.E820Reserved},
		{GPA: 0x100000, Size: 3*kGiB - 0x100000, Type: boot.E820RAM},
		{GPA: 3 * kGiB, Size: 1 * kGiB, Type: boot.E820Reserved},
		{GPA: 4 * kGiB, Size: 2 * kGiB, Type: boot.E820RAM},
	}
	require.Equal(t, wantMap, e.E820)

	// The initrd: page-aligned, as high as it goes under initrd_addr_max
	// (0x7fffffff, below the hole here), above the kernel.
	require.Equal(t, guestmem.Span{GPA: (0x80000000 - guestmem.GuestAddress(len(initrd))) &^ 0xfff, Size: uint64(len(initrd))}, e.Initrd)
	require.Equal(t, initrd, read(t, mem, e.Initrd.GPA, e.Initrd.Size))

	// Registers: the 64-bit entry, RSI at boot_params, a stack, no
	// interrupts, nothing else.
	require.Equal(t, kvm.Regs{RIP: uint64(load) + 0x200, RSI: 0x7000, RSP: 0x8ff0, RBP: 0x8ff0, RFLAGS: 2}, e.Regs)

	// boot_params.
	zp := read(t, mem, boot.ZeroPageAddr, 4096)
	le := binary.LittleEndian
	want := make([]byte, 4096)
	copy(want[0x1f1:0x26c], img[0x1f1:0x26c]) // the header: 0x202 + the jump's 0x6a
	want[0x210] = 0xff                        // type_of_loader: undefined
	le.PutUint32(want[0x214:], uint32(load))  // code32_start
	le.PutUint32(want[0x218:], uint32(e.Initrd.GPA))
	le.PutUint32(want[0x21c:], uint32(len(initrd)))
	le.PutUint32(want[0x228:], 0x20000) // cmd_line_ptr
	want[0x1e8] = byte(len(wantMap))
	for i, m := range wantMap {
		o := 0x2d0 + 20*i
		le.PutUint64(want[o:], uint64(m.GPA))
		le.PutUint64(want[o+8:], m.Size)
		le.PutUint32(want[o+16:], uint32(m.Type))
	}
	for i := range want {
		if zp[i] != want[i] {
			t.Fatalf("boot_params byte %#x = %#x, want %#x", i, zp[i], want[i])
		}
	}
	require.Equal(t, byte(0), zp[0x1ef], "sentinel")
	require.Equal(t, "HdrS", string(zp[0x202:0x206]))
	require.Equal(t, uint16(0xaa55), le.Uint16(zp[0x1fe:]))

	// The protected-mode kernel at the load address, and not the
	// signature after it; the real-mode setup nowhere.
	require.Equal(t, img[setup:setup+spec.pmSize], read(t, mem, load, uint64(spec.pmSize)))
	require.Equal(t, make([]byte, spec.trailer), read(t, mem, load+guestmem.GuestAddress(spec.pmSize), uint64(spec.trailer)))

	// The command line, NUL-terminated.
	require.Equal(t, append([]byte(cmdline), 0), read(t, mem, boot.CmdlineAddr, uint64(len(cmdline)+1)))

	// The GDT: __BOOT_CS 0x10 and __BOOT_DS 0x18 as the protocol asks,
	// encoded as Firecracker's gdt_entry (gokvm's pvh.GdtEntry) encodes
	// them, and a 16-byte TSS descriptor at 0x20.
	gdt := read(t, mem, boot.GDTAddr, 48)
	for i, d := range []uint64{0, 0, pvh.GdtEntry(0xa09b, 0, 0xfffff), pvh.GdtEntry(0xc093, 0, 0xfffff), pvh.GdtEntry(0x008b, 0, 0x67), 0} {
		require.Equalf(t, d, le.Uint64(gdt[8*i:]), "GDT entry %d", i)
	}
	require.Equal(t, uint64(0x00af9b000000ffff), le.Uint64(gdt[0x10:]))

	// Page tables: PML4[0] -> PDPT; PDPT[g] -> PD g for 6 GiB; 2 MiB pages.
	pt := read(t, mem, boot.PML4Addr, 8*4096)
	require.Equal(t, uint64(0xa003), le.Uint64(pt[0:]))
	for i := 1; i < 512; i++ {
		require.Zero(t, le.Uint64(pt[8*i:]), "PML4[%d]", i)
	}
	for g := range 512 {
		v := le.Uint64(pt[4096+8*g:])
		if g < 6 {
			require.Equal(t, uint64(0xb000+0x1000*g)|3, v, "PDPT[%d]", g)
		} else {
			require.Zero(t, v, "PDPT[%d]", g)
		}
	}
	for g := range 6 {
		for i := range 512 {
			require.Equal(t, uint64(g)<<30|uint64(i)<<21|0x83, le.Uint64(pt[(2+g)*4096+8*i:]))
		}
	}

	// Special registers: long mode on the identity map, flat segments,
	// and what KVM owns kept from the base.
	base := kvm.Sregs{CR2: 0x1234, CR8: 3, ApicBase: 0xfee00900, InterruptBitmap: [4]uint64{0, 1 << 3}, CR0: 0x60000010, EFER: 0x1}
	s := e.Sregs(base)
	code := kvm.Segment{Limit: 0xffffffff, Selector: 0x10, Typ: 11, Present: 1, S: 1, L: 1, G: 1}
	data := kvm.Segment{Limit: 0xffffffff, Selector: 0x18, Typ: 3, Present: 1, S: 1, DB: 1, G: 1}
	require.Equal(t, code, s.CS)
	for _, seg := range []kvm.Segment{s.DS, s.ES, s.FS, s.GS, s.SS} {
		require.Equal(t, data, seg)
	}
	require.Equal(t, kvm.Segment{Limit: 0x67, Selector: 0x20, Typ: 11, Present: 1}, s.TR)
	require.Equal(t, kvm.Segment{Unusable: 1}, s.LDT)
	require.Equal(t, kvm.Descriptor{Base: 0x500, Limit: 47}, s.GDT)
	require.Equal(t, kvm.Descriptor{}, s.IDT)
	require.Equal(t, uint64(kvm.CR0PE|kvm.CR0ET|kvm.CR0PG), s.CR0)
	require.Equal(t, uint64(0x9000), s.CR3)
	require.Equal(t, uint64(kvm.CR4PAE), s.CR4)
	require.Equal(t, uint64(kvm.EFERLME|kvm.EFERLMA), s.EFER)
	require.Equal(t, uint64(0x1234), s.CR2)
	require.Equal(t, uint64(3), s.CR8)
	require.Equal(t, uint64(0xfee00900), s.ApicBase)
	require.Equal(t, [4]uint64{0, 1 << 3}, s.InterruptBitmap)
	// The hidden parts are what the CPU would load from the GDT in
	// memory, by gokvm's (Firecracker's) decoding too.
	for sel, seg := range map[uint16]kvm.Segment{0x10: s.CS, 0x18: s.DS} {
		require.Equal(t, seg, fromGokvm(pvh.SegmentFromGDT(le.Uint64(gdt[sel:]), uint8(sel/8))))
	}
}

// fromGokvm converts gokvm's segment (the same struct kvm_segment) to ours.
func fromGokvm(s gokvm.Segment) kvm.Segment {
	return kvm.Segment{Base: s.Base, Limit: s.Limit, Selector: s.Selector, Typ: s.Typ, Present: s.Present, DPL: s.DPL,
		DB: s.DB, S: s.S, L: s.L, G: s.G, AVL: s.AVL, Unusable: s.Unusable}
}

// TestParseBzImageMatchesGokvm checks the header ParseBzImage reads against
// gokvm's bootparam package, which decodes the same bytes with
// encoding/binary.
func TestParseBzImageMatchesGokvm(t *testing.T) {
	img := defaultBz(nil).bytes()
	b, err := boot.ParseBzImage(bytes.NewReader(img))
	require.NoError(t, err)
	bp, err := bootparam.New(bytes.NewReader(img))
	require.NoError(t, err)
	compareHeader(t, b, bp)
	require.Equal(t, int64(5*512), b.SetupSize)
	require.Equal(t, uint64(64*kKiB), b.KernelSize)
	require.Equal(t, guestmem.GuestAddress(16*kMiB), b.LoadAddr)
	require.Equal(t, guestmem.GuestAddress(16*kMiB), b.RuntimeStart)
}

func compareHeader(t *testing.T, b *boot.BzImage, bp *bootparam.BootParam) {
	t.Helper()
	h, g := b.Header, bp.Hdr
	require.Equal(t, g.SetupSects, h.SetupSects)
	require.Equal(t, g.SysSize, h.SysSize)
	require.Equal(t, g.Version, h.Version)
	require.Equal(t, g.LoadFlags, h.LoadFlags)
	require.Equal(t, g.Code32Start, h.Code32Start)
	require.Equal(t, g.InitrdAddrMax, h.InitrdAddrMax)
	require.Equal(t, g.KernelAlignment, h.KernelAlignment)
	require.Equal(t, g.RelocatableKernel != 0, h.Relocatable)
	require.Equal(t, g.MinAlignment, h.MinAlignment)
	require.Equal(t, g.XloadFlags, h.XLoadFlags)
	require.Equal(t, g.CmdlineSize, h.CmdlineSize)
	require.Equal(t, g.PrefAddress, h.PrefAddress)
	require.Equal(t, g.InitSize, h.InitSize)
}

// TestBzImageLoadAddress checks where the kernel goes: pref_address, or
// 1 MiB without one; a relocatable kernel runs from its load address
// rounded up to kernel_alignment, a fixed one from pref_address.
func TestBzImageLoadAddress(t *testing.T) {
	for _, c := range []struct {
		name          string
		pref          uint64
		align         uint32
		reloc         bool
		load, runtime guestmem.GuestAddress
	}{
		{"pref_address", 16 * kMiB, 2 * kMiB, true, 16 * kMiB, 16 * kMiB},
		{"no pref_address: 1 MiB", 0, 2 * kMiB, true, 1 * kMiB, 2 * kMiB},
		{"not relocatable", 0, 2 * kMiB, false, 1 * kMiB, 1 * kMiB},
		{"pref_address off alignment", 17 * kMiB, 4 * kMiB, true, 17 * kMiB, 20 * kMiB},
	} {
		t.Run(c.name, func(t *testing.T) {
			spec := defaultBz(nil)
			spec.prefAddress, spec.alignment, spec.relocatable = c.pref, c.align, c.reloc
			mem := newMem(t, guestmem.X86Layout(64*kMiB))
			e, err := boot.LoadBzImage(mem, bytes.NewReader(spec.bytes()), boot.Options{})
			require.NoError(t, err)
			require.Equal(t, c.load, e.BzImage.LoadAddr)
			require.Equal(t, c.runtime, e.BzImage.RuntimeStart)
			require.Equal(t, uint64(c.load)+0x200, e.Regs.RIP)
			lo, hi := min(c.load, c.runtime), max(c.load+guestmem.GuestAddress(spec.pmSize), c.runtime+4*kMiB)
			require.Equal(t, guestmem.Span{GPA: lo, Size: uint64(hi - lo)}, e.KernelExtent)
			zp := read(t, mem, boot.ZeroPageAddr, 4096)
			require.Equal(t, uint32(c.load), binary.LittleEndian.Uint32(zp[0x214:]), "code32_start")
			require.Equal(t, uint64(0), e.Initrd.Size)
			require.Equal(t, uint64(0), binary.LittleEndian.Uint64(zp[0x218:]), "no ramdisk")
			require.Equal(t, guestmem.Span{GPA: 0, Size: 4 * kGiB}, e.IdentityMap)
		})
	}
}

// TestBzImageInitrdPlacement checks the initrd rules on several layouts: it
// starts on a page, ends at or below initrd_addr_max + 1 and below the PCI
// hole, lies in usable RAM at or above 1 MiB, does not overlap the kernel,
// and is as high as those rules allow.
func TestBzImageInitrdPlacement(t *testing.T) {
	for _, c := range []struct {
		name      string
		layout    guestmem.Layout
		initrdMax uint32
		initSize  uint32
		size      int
		want      guestmem.GuestAddress
	}{
		{"top of small RAM", guestmem.X86Layout(256 * kMiB), 0x7fffffff, 4 * kMiB, 10000, (256*kMiB - 10000) &^ 0xfff},
		{"under initrd_addr_max", guestmem.X86Layout(512 * kMiB), 0x0fffffff, 4 * kMiB, 5 * 4096, 0x10000000 - 5*4096},
		{"initrd_addr_max not page-aligned", guestmem.X86Layout(512 * kMiB), 0x0fffeffe, 4 * kMiB, 4096, 0x0fffd000},
		{"below the PCI hole", lowAndHigh(), 0xffffffff, 4 * kMiB, 3 * 4096, 3*kGiB - 3*4096},
		{"below the kernel when above is full", guestmem.X86Layout(48 * kMiB), 0x7fffffff, 32 * kMiB, 5*kMiB + 1, (16*kMiB - 5*kMiB - 1) &^ 0xfff},
		{"in the upper of two low ranges", guestmem.Layout{{GPA: 0, Size: 64 * kMiB}, {GPA: 1 * kGiB, Size: 64 * kMiB}}, 0xffffffff, 4 * kMiB, 4096, 1*kGiB + 64*kMiB - 4096},
		{"in the lower when the upper is above initrd_addr_max", guestmem.Layout{{GPA: 0, Size: 64 * kMiB}, {GPA: 1 * kGiB, Size: 64 * kMiB}}, 0x3fffffff, 4 * kMiB, 4096, 64*kMiB - 4096},
	} {
		t.Run(c.name, func(t *testing.T) {
			spec := defaultBz(nil)
			spec.initrdMax, spec.initSize = c.initrdMax, c.initSize
			mem := newMem(t, c.layout)
			initrd := patternInitrd(c.size)
			e, err := boot.LoadBzImage(mem, bytes.NewReader(spec.bytes()), boot.Options{Initrd: bytes.NewReader(initrd), InitrdSize: int64(c.size)})
			require.NoError(t, err)
			require.Equal(t, guestmem.Span{GPA: c.want, Size: uint64(c.size)}, e.Initrd)
			checkInitrdRules(t, e, uint64(c.initrdMax))
			require.Equal(t, initrd, read(t, mem, e.Initrd.GPA, e.Initrd.Size))
			zp := read(t, mem, boot.ZeroPageAddr, 4096)
			require.Equal(t, uint32(c.want), binary.LittleEndian.Uint32(zp[0x218:]))
			require.Equal(t, uint32(c.size), binary.LittleEndian.Uint32(zp[0x21c:]))
		})
	}
}

// checkInitrdRules checks e's initrd against the placement rules.
func checkInitrdRules(t *testing.T, e *boot.Entry, initrdMax uint64) {
	t.Helper()
	in := e.Initrd
	end := uint64(in.GPA) + in.Size
	require.Zero(t, uint64(in.GPA)%4096, "page-aligned")
	require.LessOrEqual(t, end-1, initrdMax, "under initrd_addr_max")
	require.LessOrEqual(t, end, uint64(boot.PCIHoleStart), "below the PCI hole")
	require.GreaterOrEqual(t, uint64(in.GPA), uint64(boot.HighMemStart))
	k := e.KernelExtent
	require.True(t, end <= uint64(k.GPA) || uint64(in.GPA) >= uint64(k.GPA)+k.Size, "initrd %+v overlaps the kernel %+v", in, k)
	usable := false
	for _, m := range e.E820 {
		if m.Type == boot.E820RAM && in.GPA >= m.GPA && guestmem.GuestAddress(end) <= m.End() {
			usable = true
		}
	}
	require.True(t, usable, "initrd %+v in one usable entry of %+v", in, e.E820)
}

// TestBzImageErrors checks every way a bzImage, its initrd or its command
// line can be refused: the sentinel, the *ImageError naming the image, and
// that nothing was written to guest memory.
func TestBzImageErrors(t *testing.T) {
	u32 := func(v uint32) *uint32 { return &v }
	small := guestmem.X86Layout(64 * kMiB)
	for _, c := range []struct {
		name   string
		edit   func(*bzSpec)
		cut    int // bytes cut off the end of the image
		layout guestmem.Layout
		opts   func() boot.Options
		image  string
		err    error
	}{
		{name: "bad magic", edit: func(s *bzSpec) { s.magic = 0x12345678 }, image: "bzImage", err: boot.ErrBadMagic},
		{name: "protocol 2.05", edit: func(s *bzSpec) { s.version = 0x0205 }, image: "bzImage", err: boot.ErrProtocolVersion},
		{name: "protocol 2.00", edit: func(s *bzSpec) { s.version = 0x0200 }, image: "bzImage", err: boot.ErrProtocolVersion},
		{name: "zImage: LOADED_HIGH clear", edit: func(s *bzSpec) { s.loadFlags = 0x80 }, image: "bzImage", err: boot.ErrBadHeader},
		{name: "protocol 2.11 has no xloadflags", edit: func(s *bzSpec) { s.version = 0x020b }, image: "bzImage", err: boot.ErrNot64Bit},
		{name: "no XLF_KERNEL_64", edit: func(s *bzSpec) { s.xloadFlags = 0x7e }, image: "bzImage", err: boot.ErrNot64Bit},
		{name: "syssize 0", edit: func(s *bzSpec) { s.sysSize = u32(0) }, image: "bzImage", err: boot.ErrBadHeader},
		{name: "init_size 0", edit: func(s *bzSpec) { s.initSize = 0 }, image: "bzImage", err: boot.ErrBadHeader},
		{name: "kernel_alignment not a power of two", edit: func(s *bzSpec) { s.alignment = 3 * kMiB }, image: "bzImage", err: boot.ErrBadHeader},
		{name: "header shorter than protocol 2.12's", edit: func(s *bzSpec) { s.jump = 0x40 }, image: "bzImage", err: boot.ErrBadHeader},
		{name: "pref_address above 4 GiB", edit: func(s *bzSpec) { s.prefAddress = 5 * kGiB }, image: "bzImage", err: boot.ErrBadHeader},
		{name: "truncated kernel", cut: 1234 + 1, image: "bzImage", err: boot.ErrTruncated},
		{name: "syssize past the end", edit: func(s *bzSpec) { s.sysSize = u32(1 << 20) }, image: "bzImage", err: boot.ErrTruncated},
		{name: "truncated setup header", cut: 64*kKiB + 1234 + 5*512 - 0x230, image: "bzImage", err: boot.ErrTruncated},
		{name: "no setup header at all", cut: 64*kKiB + 1234 + 5*512 - 0x100, image: "bzImage", err: boot.ErrBadMagic},
		{name: "kernel past the top of RAM", layout: guestmem.X86Layout(18 * kMiB), image: "bzImage", err: boot.ErrNoRoom},
		{name: "init_size past the top of RAM", edit: func(s *bzSpec) { s.initSize = 60 * kMiB }, layout: small, image: "bzImage", err: boot.ErrNoRoom},
		{name: "kernel across a hole", layout: guestmem.Layout{{GPA: 0, Size: 18 * kMiB}, {GPA: 32 * kMiB, Size: 32 * kMiB}}, image: "bzImage", err: boot.ErrHole},
		{name: "kernel in the PCI hole", edit: func(s *bzSpec) { s.prefAddress = 3*kGiB + 16*kMiB }, layout: lowAndHigh(), image: "bzImage", err: boot.ErrHole},
		{name: "kernel on a read-only region", layout: guestmem.Layout{{GPA: 0, Size: 16 * kMiB}, {GPA: 16 * kMiB, Size: 16 * kMiB, ReadOnly: true}, {GPA: 32 * kMiB, Size: 32 * kMiB}}, image: "bzImage", err: boot.ErrHole},
		{name: "kernel in the boot data area", edit: func(s *bzSpec) { s.prefAddress = 0x10000; s.relocatable = false }, image: "bzImage", err: boot.ErrOverlap},
		{name: "kernel in the BIOS area", edit: func(s *bzSpec) { s.prefAddress = 0xa0000; s.relocatable = false }, image: "bzImage", err: boot.ErrOverlap},
		{
			name: "initrd too big", layout: small, image: "initrd", err: boot.ErrNoRoom,
			opts: func() boot.Options {
				return boot.Options{Initrd: bytes.NewReader(make([]byte, 60*kMiB)), InitrdSize: 60 * kMiB}
			},
		},
		{
			name: "initrd above initrd_addr_max only", edit: func(s *bzSpec) { s.initrdMax = 8 * kMiB }, layout: small, image: "initrd", err: boot.ErrNoRoom,
			opts: func() boot.Options {
				return boot.Options{Initrd: bytes.NewReader(make([]byte, 8*kMiB)), InitrdSize: 8 * kMiB}
			},
		},
		{
			name: "truncated initrd", image: "initrd", err: boot.ErrTruncated,
			opts: func() boot.Options {
				return boot.Options{Initrd: bytes.NewReader(make([]byte, 4096)), InitrdSize: 8192}
			},
		},
		{
			name: "command line longer than cmdline_size", edit: func(s *bzSpec) { s.cmdlineSize = 16 }, image: "cmdline", err: boot.ErrCmdlineTooLong,
			opts: func() boot.Options { return boot.Options{Cmdline: "0123456789abcdefg"} },
		},
		{
			name: "command line longer than the area", edit: func(s *bzSpec) { s.cmdlineSize = 1 << 20 }, image: "cmdline", err: boot.ErrCmdlineTooLong,
			opts: func() boot.Options { return boot.Options{Cmdline: string(bytes.Repeat([]byte("x"), boot.CmdlineMax))} },
		},
		{
			name: "NUL in the command line", err: boot.ErrBadOption,
			opts: func() boot.Options { return boot.Options{Cmdline: "a\x00b"} },
		},
		{
			name: "InitrdSize without Initrd", err: boot.ErrBadOption,
			opts: func() boot.Options { return boot.Options{InitrdSize: 10} },
		},
		{
			name: "Initrd without InitrdSize", err: boot.ErrBadOption,
			opts: func() boot.Options { return boot.Options{Initrd: bytes.NewReader(nil)} },
		},
		{name: "no RAM for the boot data", layout: guestmem.Layout{{GPA: 1 * kMiB, Size: 63 * kMiB}}, err: boot.ErrLayout},
		{name: "RAM in the PCI hole", layout: guestmem.Layout{{GPA: 0, Size: 64 * kMiB}, {GPA: 3*kGiB + 512*kMiB, Size: 2 * kMiB}}, err: boot.ErrLayout},
	} {
		t.Run(c.name, func(t *testing.T) {
			spec := defaultBz(e820Walker(t))
			if c.edit != nil {
				c.edit(&spec)
			}
			img := spec.bytes()
			img = img[:len(img)-c.cut]
			l := c.layout
			if l == nil {
				l = small
			}
			mem := newMem(t, l)
			opts := boot.Options{Cmdline: "console=ttyS0"}
			if c.opts != nil {
				opts = c.opts()
			}
			e, err := boot.LoadBzImage(mem, bytes.NewReader(img), opts)
			require.Nil(t, e)
			require.ErrorIs(t, err, c.err)
			var ie *boot.ImageError
			if c.image == "" {
				require.False(t, errors.As(err, &ie), "%v is about the options or layout, not an image", err)
			} else {
				require.ErrorAs(t, err, &ie)
				require.Equal(t, c.image, ie.Image)
			}
			require.Contains(t, err.Error(), "boot: ")
			t.Log(err)
			assertUntouched(t, mem)
		})
	}
}

// assertUntouched checks that the boot data area and the kernel's first
// page are still zero: a refused load writes nothing.
func assertUntouched(t *testing.T, mem *guestmem.Memory) {
	t.Helper()
	for _, a := range []guestmem.GuestAddress{boot.GDTAddr, boot.StartInfoAddr, boot.ZeroPageAddr, boot.PML4Addr, boot.CmdlineAddr, 16 * kMiB} {
		b := make([]byte, 4096)
		if _, err := mem.ReadAt(b, int64(a)); err != nil {
			continue // not RAM in this layout
		}
		require.Equal(t, make([]byte, 4096), b, "guest memory at %v written by a refused load", a)
	}
}

// TestLoadDetectsFormat checks that Load takes a bzImage down the 64-bit
// path, an ELF down the PVH path, and anything else as ErrBadMagic.
func TestLoadDetectsFormat(t *testing.T) {
	mem := newMem(t, guestmem.X86Layout(64*kMiB))
	e, err := boot.Load(mem, bytes.NewReader(defaultBz(nil).bytes()), boot.Options{})
	require.NoError(t, err)
	require.Equal(t, boot.LinuxBoot64, e.Protocol)
	e, err = boot.Load(mem, bytes.NewReader(defaultELF().bytes()), boot.Options{})
	require.NoError(t, err)
	require.Equal(t, boot.PVH, e.Protocol)
	for _, junk := range [][]byte{nil, []byte("\x7fEL"), bytes.Repeat([]byte{0x90}, 4096)} {
		_, err = boot.Load(mem, bytes.NewReader(junk), boot.Options{})
		require.ErrorIs(t, err, boot.ErrBadMagic)
		var ie *boot.ImageError
		require.ErrorAs(t, err, &ie)
		require.Equal(t, "kernel", ie.Image)
	}
}
