//go:build amd64

package boot_test

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
)

const (
	kKiB = 1 << 10
	kMiB = 1 << 20
	kGiB = 1 << 30
)

// bzSpec describes a synthetic bzImage: a boot sector and setup sectors
// holding a setup header, then the protected-mode kernel, whose 64-bit
// entry at +0x200 is code. Fields are the header's.
type bzSpec struct {
	magic       uint32
	version     uint16
	loadFlags   uint8
	xloadFlags  uint16
	setupSects  uint8
	jump        uint8 // header length past 0x202
	prefAddress uint64
	alignment   uint32
	relocatable bool
	initSize    uint32
	cmdlineSize uint32
	initrdMax   uint32
	code        []byte // the 64-bit entry's code, at +0x200
	pmSize      int    // size of the protected-mode kernel, a multiple of 16
	trailer     int    // bytes after the kernel that syssize does not count (a signature)
	sysSize     *uint32
}

// defaultBz is a bzImage of protocol 2.15 as Debian's: relocatable,
// preferring 16 MiB, 2 MiB alignment, 4 MiB of init_size.
func defaultBz(code []byte) bzSpec {
	return bzSpec{
		magic: 0x53726448, version: 0x020f, loadFlags: 0x01, xloadFlags: 0x7f, setupSects: 4, jump: 0x6a,
		prefAddress: 16 * kMiB, alignment: 2 * kMiB, relocatable: true, initSize: 4 * kMiB,
		cmdlineSize: 2047, initrdMax: 0x7fffffff, code: code, pmSize: 64 * kKiB, trailer: 1234,
	}
}

// bytes builds the image. Every byte that is neither header nor code holds
// a position-dependent pattern, so a copy from the wrong offset shows.
func (s bzSpec) bytes() []byte {
	sects := int(s.setupSects)
	if sects == 0 {
		sects = 4
	}
	setup := (sects + 1) * 512
	b := make([]byte, setup+s.pmSize+s.trailer)
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	le := binary.LittleEndian
	// Header fields the loader does not interpret still hold the pattern
	// (they must reach boot_params unchanged); these it reads or sets.
	b[0x1f1] = s.setupSects
	sys := uint32(s.pmSize / 16)
	if s.sysSize != nil {
		sys = *s.sysSize
	}
	le.PutUint32(b[0x1f4:], sys)
	le.PutUint16(b[0x1fe:], 0xaa55)
	b[0x200], b[0x201] = 0xeb, s.jump
	le.PutUint32(b[0x202:], s.magic)
	le.PutUint16(b[0x206:], s.version)
	b[0x210] = 0 // type_of_loader: the loader sets it
	b[0x211] = s.loadFlags
	le.PutUint32(b[0x214:], 0x100000)
	le.PutUint64(b[0x218:], 0) // ramdisk_image, ramdisk_size
	le.PutUint32(b[0x228:], 0) // cmd_line_ptr
	le.PutUint32(b[0x22c:], s.initrdMax)
	le.PutUint32(b[0x230:], s.alignment)
	b[0x234] = 0
	if s.relocatable {
		b[0x234] = 1
	}
	b[0x235] = 21
	le.PutUint16(b[0x236:], s.xloadFlags)
	le.PutUint32(b[0x238:], s.cmdlineSize)
	le.PutUint64(b[0x258:], s.prefAddress)
	le.PutUint32(b[0x260:], s.initSize)
	pm := b[setup : setup+s.pmSize]
	for i := 0x200; i < len(pm) && i-0x200 < len(s.code); i++ {
		pm[i] = s.code[i-0x200]
	}
	return b
}

// setupSize is the offset of the protected-mode kernel in the image.
func (s bzSpec) setupSize() int {
	if s.setupSects == 0 {
		return 5 * 512
	}
	return (int(s.setupSects) + 1) * 512
}

// elfSeg is one PT_LOAD segment of a synthetic ELF.
type elfSeg struct {
	paddr uint64
	data  []byte
	memsz uint64 // 0 means len(data)
}

// elfNote is one note of the PT_NOTE segment.
type elfNote struct {
	name string // without the NUL
	typ  uint32
	desc []byte
}

// elfSpec describes a synthetic ELF kernel: an ELF header, a PT_NOTE and
// the PT_LOADs, then the note data and the segments' data, each at a
// 4 KiB-aligned offset.
type elfSpec struct {
	class     elf.Class
	machine   elf.Machine
	segs      []elfSeg
	notes     []elfNote
	noteAlign uint64 // 4 (default) or 8
	entry     uint64 // e_entry (not used by PVH)
}

// pvhNote is the XEN_ELFNOTE_PHYS32_ENTRY note for entry, with a desc of
// size 4 or 8.
func pvhNote(entry uint64, size int) elfNote {
	d := make([]byte, 8)
	binary.LittleEndian.PutUint64(d, entry)
	return elfNote{name: "Xen", typ: 18, desc: d[:size]}
}

// defaultELF is a two-segment kernel at 16 MiB with its PVH entry 0x40 into
// the first, and two other Xen notes before it.
func defaultELF() elfSpec {
	text := make([]byte, 0x3000)
	for i := range text {
		text[i] = byte(i*13 + 1)
	}
	data := make([]byte, 0x1800)
	for i := range data {
		data[i] = byte(i*5 + 3)
	}
	return elfSpec{
		class: elf.ELFCLASS64, machine: elf.EM_X86_64, entry: 0x1000000,
		segs: []elfSeg{{paddr: 0x1000000, data: text}, {paddr: 0x1200000, data: data, memsz: 0x5000}},
		notes: []elfNote{
			{name: "Xen", typ: 6, desc: []byte("linux\x00")},
			{name: "GNU", typ: 3, desc: bytes.Repeat([]byte{0xab}, 20)},
			pvhNote(0x1000040, 8),
		},
	}
}

func (s elfSpec) noteBytes() []byte {
	align := s.noteAlign
	if align == 0 {
		align = 4
	}
	pad := func(b []byte) []byte {
		for uint64(len(b))%align != 0 {
			b = append(b, 0)
		}
		return b
	}
	var b []byte
	le := binary.LittleEndian
	for _, n := range s.notes {
		name := append([]byte(n.name), 0)
		b = le.AppendUint32(b, uint32(len(name)))
		b = le.AppendUint32(b, uint32(len(n.desc)))
		b = le.AppendUint32(b, n.typ)
		b = pad(append(b, name...))
		b = pad(append(b, n.desc...))
	}
	return b
}

// bytes builds the file, with the layout of a linked kernel: ELF header,
// program headers (the note first), then data.
func (s elfSpec) bytes() []byte {
	le := binary.LittleEndian
	nph := 1 + len(s.segs)
	notes := s.noteBytes()
	noteOff := uint64(64 + 56*nph)
	off := (noteOff + uint64(len(notes)) + 0xfff) &^ 0xfff
	type ph struct{ typ, off, paddr, filesz, memsz, align uint64 }
	phs := []ph{{typ: uint64(elf.PT_NOTE), off: noteOff, paddr: 0, filesz: uint64(len(notes)), memsz: uint64(len(notes)), align: max(s.noteAlign, 4)}}
	for _, sg := range s.segs {
		memsz := sg.memsz
		if memsz == 0 {
			memsz = uint64(len(sg.data))
		}
		phs = append(phs, ph{typ: uint64(elf.PT_LOAD), off: off, paddr: sg.paddr, filesz: uint64(len(sg.data)), memsz: memsz, align: 0x1000})
		off = (off + uint64(len(sg.data)) + 0xfff) &^ 0xfff
	}
	b := make([]byte, off)
	copy(b, "\x7fELF")
	b[elf.EI_CLASS] = byte(s.class)
	b[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	b[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	le.PutUint16(b[16:], uint16(elf.ET_EXEC))
	le.PutUint16(b[18:], uint16(s.machine))
	le.PutUint32(b[20:], uint32(elf.EV_CURRENT))
	le.PutUint64(b[24:], s.entry)
	le.PutUint64(b[32:], 64) // e_phoff
	le.PutUint64(b[40:], 0)  // e_shoff: no section headers
	le.PutUint16(b[52:], 64) // e_ehsize
	le.PutUint16(b[54:], 56) // e_phentsize
	le.PutUint16(b[56:], uint16(nph))
	le.PutUint16(b[58:], 64) // e_shentsize
	for i, p := range phs {
		o := 64 + 56*i
		le.PutUint32(b[o:], uint32(p.typ))
		flags := uint32(elf.PF_R | elf.PF_X)
		if p.typ == uint64(elf.PT_NOTE) {
			flags = uint32(elf.PF_R)
		}
		le.PutUint32(b[o+4:], flags)
		le.PutUint64(b[o+8:], p.off)
		le.PutUint64(b[o+16:], p.paddr|0xffffffff80000000) // p_vaddr: where a linked kernel runs
		le.PutUint64(b[o+24:], p.paddr)
		le.PutUint64(b[o+32:], p.filesz)
		le.PutUint64(b[o+40:], p.memsz)
		le.PutUint64(b[o+48:], p.align)
	}
	copy(b[noteOff:], notes)
	for i, sg := range s.segs {
		copy(b[phs[1+i].off:], sg.data)
	}
	return b
}

// newMem makes guest memory with layout l, closed at cleanup.
func newMem(t *testing.T, l guestmem.Layout) *guestmem.Memory {
	t.Helper()
	m, err := guestmem.New(l)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	return m
}

// lowAndHigh is a layout with RAM below and above 4 GiB: the usual PC map of
// 5 GiB (3 GiB low, 2 GiB high). Its memory is reserved, not touched.
func lowAndHigh() guestmem.Layout { return guestmem.X86Layout(5 * kGiB) }

// read reads n bytes of guest memory at a.
func read(t *testing.T, m *guestmem.Memory, a guestmem.GuestAddress, n uint64) []byte {
	t.Helper()
	b := make([]byte, n)
	_, err := m.ReadAt(b, int64(a))
	require.NoError(t, err)
	return b
}

// patternInitrd is an initrd of n bytes with a recognisable pattern.
func patternInitrd(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*31 + i>>12)
	}
	return b
}
