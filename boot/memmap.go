//go:build amd64

package boot

import (
	"fmt"
	"slices"

	"github.com/gmem-vmm/gmem/guestmem"
)

// Where the loader puts its boot data in guest memory, all in the first
// 192 KiB of RAM, which must be usable (Firecracker's and Cloud
// Hypervisor's addresses, so a reader of either finds their way). The
// kernel goes at or above HighMemStart.
const (
	// GDTAddr holds the boot GDT: 4 entries for PVH, 6 for the 64-bit
	// protocol (the 16-byte TSS descriptor ends at 0x530).
	GDTAddr guestmem.GuestAddress = 0x500
	// StartInfoAddr holds PVH's struct hvm_start_info (56 bytes); RBX
	// points at it.
	StartInfoAddr guestmem.GuestAddress = 0x6000
	// ModlistAddr holds PVH's module list: one hvm_modlist_entry (32
	// bytes), the initrd.
	ModlistAddr guestmem.GuestAddress = 0x6040
	// ZeroPageAddr holds the bzImage's struct boot_params, the "zero
	// page" (4 KiB); RSI points at it.
	ZeroPageAddr guestmem.GuestAddress = 0x7000
	// MemmapAddr holds PVH's memory map, E820Max entries of 24 bytes at
	// most. It shares the zero page's place: a boot uses one or the other.
	MemmapAddr guestmem.GuestAddress = 0x7000
	// StackTop is RSP (and RBP) for the 64-bit entry: the kernel sets up
	// its own stack at once, but the protocol gives it one.
	StackTop guestmem.GuestAddress = 0x8ff0
	// PML4Addr, PDPTAddr and PDAddr hold the 64-bit entry's identity map:
	// one PML4, one PDPT, and one page directory of 2 MiB pages per GiB
	// mapped (at most MaxIdentityMapGiB, so they end by 0x1b000).
	PML4Addr guestmem.GuestAddress = 0x9000 // the PML4; CR3 points here
	PDPTAddr guestmem.GuestAddress = 0xa000 // the one page-directory-pointer table
	PDAddr   guestmem.GuestAddress = 0xb000 // the page directory of the first GiB; the others follow
	// CmdlineAddr holds the NUL-terminated kernel command line.
	CmdlineAddr guestmem.GuestAddress = 0x20000
	// CmdlineMax is the size of the command-line area, the NUL included.
	CmdlineMax = 0x10000
	// bootDataEnd is the end of the boot data: it must all be usable RAM.
	bootDataEnd = CmdlineAddr + CmdlineMax
)

// The PC memory map the loader reports.
const (
	// EBDAStart is where the extended BIOS data area starts on a PC, the
	// top of the 639 KiB of conventional memory. From here to
	// HighMemStart (EBDA, VGA window, option and BIOS ROMs) the map is
	// reserved, whatever the layout holds there.
	EBDAStart guestmem.GuestAddress = 0x9fc00
	// HighMemStart is 1 MiB, where "high memory" starts: the lowest
	// address a kernel may be loaded at.
	HighMemStart guestmem.GuestAddress = 0x100000
	// PCIHoleStart and PCIHoleEnd bound the 32-bit PCI hole, reserved in
	// the map: guestmem.X86Layout's [3 GiB, 4 GiB). A layout must have no
	// RAM there.
	PCIHoleStart = guestmem.X86PCIHoleStart // 3 GiB
	PCIHoleEnd   = guestmem.X86HighMemStart // 4 GiB
	// E820Max is the most entries a memory map may have: the size of
	// boot_params.e820_table (E820_MAX_ENTRIES_ZEROPAGE).
	E820Max = 128
	// MaxIdentityMapGiB bounds the 64-bit entry's identity map: it covers
	// [0, max(4 GiB, top of RAM)) rounded up to a GiB, up to 16 GiB.
	MaxIdentityMapGiB = 16
)

// E820Type is the type of a memory-map entry, as E820 and PVH's memmap
// number them (XEN_HVM_MEMMAP_TYPE_* has the same values).
type E820Type uint32

// The types this loader reports.
const (
	E820RAM      E820Type = 1 // usable RAM
	E820Reserved E820Type = 2 // not for the OS: firmware, holes, ROM
)

// String names the type as Linux prints it in its "BIOS-e820" lines.
func (t E820Type) String() string {
	switch t {
	case E820RAM:
		return "usable"
	case E820Reserved:
		return "reserved"
	}
	return fmt.Sprintf("type %d", uint32(t))
}

// E820Entry is one entry of the guest's memory map: in boot_params'
// e820_table for a bzImage, in hvm_start_info's memmap for PVH.
type E820Entry struct {
	GPA  guestmem.GuestAddress // first address
	Size uint64                // bytes
	Type E820Type              // usable or reserved
}

// End returns the first address past the entry.
func (e E820Entry) End() guestmem.GuestAddress { return e.GPA + guestmem.GuestAddress(e.Size) }

// MemoryMap returns the memory map the loader reports for layout l, sorted
// by address, adjacent entries of one type merged:
//   - every writable region is usable RAM, except the part inside
//     [EBDAStart, HighMemStart);
//   - [EBDAStart, HighMemStart) is reserved, and so is the PCI hole
//     [PCIHoleStart, PCIHoleEnd);
//   - a read-only region (ROM, firmware) is reserved.
//
// So the usable entries are exactly the layout's writable RAM less the BIOS
// area, and nothing else. A layout with RAM in the PCI hole, an invalid
// layout, or one whose map would need more than E820Max entries is
// ErrLayout.
func MemoryMap(l guestmem.Layout) ([]E820Entry, error) {
	if err := l.Validate(4096, guestmem.MaxGuestAddress); err != nil {
		return nil, fmt.Errorf("boot: %w: %w", ErrLayout, err)
	}
	var out []E820Entry
	for _, r := range l {
		if r.GPA < PCIHoleEnd && r.End() > PCIHoleStart {
			return nil, fmt.Errorf("boot: %w: region [%v, %v) is inside the PCI hole [%v, %v)",
				ErrLayout, r.GPA, r.End(), PCIHoleStart, PCIHoleEnd)
		}
		typ := E820RAM
		if r.ReadOnly {
			typ = E820Reserved
		}
		// Cut the BIOS area out: it is reported reserved below.
		if r.GPA < EBDAStart {
			out = append(out, E820Entry{GPA: r.GPA, Size: uint64(min(r.End(), EBDAStart) - r.GPA), Type: typ})
		}
		if r.End() > HighMemStart {
			lo := max(r.GPA, HighMemStart)
			out = append(out, E820Entry{GPA: lo, Size: uint64(r.End() - lo), Type: typ})
		}
	}
	out = append(out,
		E820Entry{GPA: EBDAStart, Size: uint64(HighMemStart - EBDAStart), Type: E820Reserved},
		E820Entry{GPA: PCIHoleStart, Size: uint64(PCIHoleEnd - PCIHoleStart), Type: E820Reserved})
	slices.SortFunc(out, func(a, b E820Entry) int {
		switch {
		case a.GPA < b.GPA:
			return -1
		case a.GPA > b.GPA:
			return 1
		}
		return 0
	})
	// Nothing overlaps: regions of a valid layout never do, the BIOS area
	// was cut out of them, and none is in the PCI hole. Entries of one
	// type that touch become one.
	merged := out[:1]
	for _, e := range out[1:] {
		if last := &merged[len(merged)-1]; e.Type == last.Type && e.GPA == last.End() {
			last.Size += e.Size
			continue
		}
		merged = append(merged, e)
	}
	if len(merged) > E820Max {
		return nil, fmt.Errorf("boot: %w: the memory map has %d entries, boot_params holds %d", ErrLayout, len(merged), E820Max)
	}
	return merged, nil
}

// layoutOf returns mem's current regions as a layout.
func layoutOf(mem *guestmem.Memory) guestmem.Layout {
	var l guestmem.Layout
	for _, r := range mem.Regions() {
		l = append(l, guestmem.RegionSpec{GPA: r.GPA, Size: r.Size, ReadOnly: r.ReadOnly})
	}
	return l
}

// memMap is a memory map with the queries placement needs.
type memMap []E820Entry

// usable returns the usable entry containing all of [a, a+n), if one does.
func (m memMap) usable(a guestmem.GuestAddress, n uint64) (E820Entry, bool) {
	for _, e := range m {
		if e.Type == E820RAM && a >= e.GPA && n <= e.Size && uint64(a-e.GPA) <= e.Size-n {
			return e, true
		}
	}
	return E820Entry{}, false
}

// place checks that [a, a+n) can hold part of the kernel: usable RAM, at or
// above HighMemStart. The error is ErrOverlap (below HighMemStart), ErrNoRoom
// (past the top of usable RAM or overflowing) or ErrHole (across a hole or a
// reserved range).
func (m memMap) place(a guestmem.GuestAddress, n uint64) error {
	switch {
	case a < HighMemStart:
		return ErrOverlap
	case n > uint64(guestmem.MaxGuestAddress) || a > guestmem.MaxGuestAddress-guestmem.GuestAddress(n):
		return ErrNoRoom
	}
	if _, ok := m.usable(a, n); ok {
		return nil
	}
	var top guestmem.GuestAddress
	for _, e := range m {
		if e.Type == E820RAM {
			top = max(top, e.End())
		}
	}
	if a+guestmem.GuestAddress(n) > top {
		return ErrNoRoom
	}
	return ErrHole
}

// highest returns the highest page-aligned address a at which [a, a+n) lies
// in usable RAM, at or above HighMemStart, below limit, and outside every
// span of avoid; ok is false if there is none.
func (m memMap) highest(n uint64, limit guestmem.GuestAddress, avoid ...guestmem.Span) (guestmem.GuestAddress, bool) {
	const page = 4096
	type span struct{ lo, hi guestmem.GuestAddress }
	var free []span
	for _, e := range m {
		if e.Type != E820RAM {
			continue
		}
		free = append(free, span{max(e.GPA, HighMemStart), min(e.End(), limit)})
	}
	for _, a := range avoid {
		var next []span
		for _, f := range free {
			aEnd := a.GPA + guestmem.GuestAddress(a.Size)
			if aEnd <= f.lo || a.GPA >= f.hi {
				next = append(next, f)
				continue
			}
			if a.GPA > f.lo {
				next = append(next, span{f.lo, a.GPA})
			}
			if aEnd < f.hi {
				next = append(next, span{aEnd, f.hi})
			}
		}
		free = next
	}
	best, ok := guestmem.GuestAddress(0), false
	for _, f := range free {
		if f.hi <= f.lo || uint64(f.hi-f.lo) < n {
			continue
		}
		a := (f.hi - guestmem.GuestAddress(n)) &^ (page - 1)
		if a >= f.lo && (!ok || a > best) {
			best, ok = a, true
		}
	}
	return best, ok
}
