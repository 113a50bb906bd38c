//go:build amd64

package boot_test

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/boot"
	"github.com/gmem-vmm/gmem/guestmem"
)

const (
	ram = boot.E820RAM
	res = boot.E820Reserved
)

func TestMemoryMap(t *testing.T) {
	bios := boot.E820Entry{GPA: 0x9fc00, Size: 0x60400, Type: res}
	hole := boot.E820Entry{GPA: 3 * kGiB, Size: 1 * kGiB, Type: res}
	for _, c := range []struct {
		name   string
		layout guestmem.Layout
		want   []boot.E820Entry
	}{
		{"128 MiB", guestmem.X86Layout(128 * kMiB), []boot.E820Entry{{0, 0x9fc00, ram}, bios, {0x100000, 127 * kMiB, ram}, hole}},
		{"3 GiB exactly: the low region ends at the hole", guestmem.X86Layout(3 * kGiB), []boot.E820Entry{{0, 0x9fc00, ram}, bios, {0x100000, 3*kGiB - 0x100000, ram}, hole}},
		{"8 GiB: RAM above 4 GiB", guestmem.X86Layout(8 * kGiB), []boot.E820Entry{{0, 0x9fc00, ram}, bios, {0x100000, 3*kGiB - 0x100000, ram}, hole, {4 * kGiB, 5 * kGiB, ram}}},
		{"contiguous regions merge", guestmem.Layout{{GPA: 64 * kMiB, Size: 64 * kMiB}, {GPA: 0, Size: 64 * kMiB}}, []boot.E820Entry{{0, 0x9fc00, ram}, bios, {0x100000, 127 * kMiB, ram}, hole}},
		{"a gap stays out of the map", guestmem.Layout{{GPA: 0, Size: 64 * kMiB}, {GPA: 1 * kGiB, Size: 64 * kMiB}}, []boot.E820Entry{{0, 0x9fc00, ram}, bios, {0x100000, 63 * kMiB, ram}, {1 * kGiB, 64 * kMiB, ram}, hole}},
		{"a ROM is reserved (and touches the hole)", guestmem.Layout{{GPA: 0, Size: 64 * kMiB}, {GPA: 4 * kGiB, Size: 2 * kMiB, ReadOnly: true}, {GPA: 4*kGiB + 2*kMiB, Size: 2 * kMiB}}, []boot.E820Entry{{0, 0x9fc00, ram}, bios, {0x100000, 63 * kMiB, ram}, {3 * kGiB, 1*kGiB + 2*kMiB, res}, {4*kGiB + 2*kMiB, 2 * kMiB, ram}}},
		{"a ROM next to the hole joins it", guestmem.Layout{{GPA: 0, Size: 64 * kMiB}, {GPA: 3*kGiB - 1*kMiB, Size: 1 * kMiB, ReadOnly: true}}, []boot.E820Entry{{0, 0x9fc00, ram}, bios, {0x100000, 63 * kMiB, ram}, {3*kGiB - 1*kMiB, 1*kGiB + 1*kMiB, res}}},
		{"a ROM in the BIOS area is the BIOS area", guestmem.Layout{{GPA: 0, Size: 0x9f000}, {GPA: 0xf0000, Size: 0x10000, ReadOnly: true}, {GPA: 0x100000, Size: 63 * kMiB}}, []boot.E820Entry{{0, 0x9f000, ram}, bios, {0x100000, 63 * kMiB, ram}, hole}},
		{"no RAM below 1 MiB", guestmem.Layout{{GPA: 1 * kMiB, Size: 63 * kMiB}}, []boot.E820Entry{bios, {0x100000, 63 * kMiB, ram}, hole}},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := boot.MemoryMap(c.layout)
			require.NoError(t, err)
			require.Equal(t, c.want, got)
			checkMap(t, c.layout, got)
		})
	}
}

// TestMemoryMapMatchesLayout checks MemoryMap on random layouts: sorted,
// no overlap, no two touching entries of one type; the usable entries are
// exactly the writable RAM less the BIOS area, page for page; and the
// reserved ones exactly the BIOS area, the PCI hole and the read-only
// regions.
func TestMemoryMapMatchesLayout(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 500 {
		var l guestmem.Layout
		at := uint64(0)
		if r.IntN(4) == 0 {
			at = uint64(r.IntN(512)) * 4096
		}
		for range 1 + r.IntN(8) {
			size := uint64(1+r.IntN(1<<14)) * 4096
			if at < uint64(boot.PCIHoleEnd) && at+size > uint64(boot.PCIHoleStart) {
				at = uint64(boot.PCIHoleEnd)
			}
			l = append(l, guestmem.RegionSpec{GPA: guestmem.GuestAddress(at), Size: size, ReadOnly: r.IntN(5) == 0})
			at += size
			if r.IntN(2) == 0 {
				at += uint64(r.IntN(1<<16)) * 4096
			}
			if r.IntN(6) == 0 {
				at = max(at, uint64(boot.PCIHoleEnd))
			}
		}
		r.Shuffle(len(l), func(i, j int) { l[i], l[j] = l[j], l[i] })
		got, err := boot.MemoryMap(l)
		require.NoError(t, err, "%+v", l)
		checkMap(t, l, got)
	}
}

// span is a half-open range for the set arithmetic of checkMap.
type span struct{ lo, hi uint64 }

// normalize sorts and merges spans.
func normalize(s []span) []span {
	s = slices.DeleteFunc(slices.Clone(s), func(x span) bool { return x.hi <= x.lo })
	slices.SortFunc(s, func(a, b span) int { return int(int64(a.lo>>12) - int64(b.lo>>12)) })
	var out []span
	for _, x := range s {
		if n := len(out); n > 0 && x.lo <= out[n-1].hi {
			out[n-1].hi = max(out[n-1].hi, x.hi)
			continue
		}
		out = append(out, x)
	}
	return out
}

// minus returns a less b.
func minus(a []span, b span) []span {
	var out []span
	for _, x := range a {
		if b.hi <= x.lo || b.lo >= x.hi {
			out = append(out, x)
			continue
		}
		out = append(out, span{x.lo, min(x.hi, b.lo)}, span{max(x.lo, b.hi), x.hi})
	}
	return normalize(out)
}

func checkMap(t *testing.T, l guestmem.Layout, m []boot.E820Entry) {
	t.Helper()
	biosArea := span{uint64(boot.EBDAStart), uint64(boot.HighMemStart)}
	pciHole := span{uint64(boot.PCIHoleStart), uint64(boot.PCIHoleEnd)}
	var usable, reserved, wantUsable, wantReserved []span
	for i, e := range m {
		require.NotZero(t, e.Size)
		if i > 0 {
			p := m[i-1]
			require.LessOrEqual(t, p.End(), e.GPA, "sorted, no overlap: %+v", m)
			require.False(t, p.End() == e.GPA && p.Type == e.Type, "touching entries of one type are merged: %+v", m)
		}
		s := span{uint64(e.GPA), uint64(e.End())}
		if e.Type == ram {
			usable = append(usable, s)
		} else {
			reserved = append(reserved, s)
		}
	}
	for _, r := range l {
		s := span{uint64(r.GPA), uint64(r.End())}
		if r.ReadOnly {
			wantReserved = append(wantReserved, s)
		} else {
			wantUsable = append(wantUsable, s)
		}
	}
	wantUsable = minus(normalize(wantUsable), biosArea)
	wantReserved = normalize(append(wantReserved, biosArea, pciHole))
	require.Equal(t, wantUsable, normalize(usable), "usable entries are the layout's writable RAM")
	require.Equal(t, wantReserved, normalize(reserved), "reserved entries are the BIOS area, the hole, the ROMs")
	require.LessOrEqual(t, len(m), boot.E820Max)
}

func TestMemoryMapErrors(t *testing.T) {
	many := guestmem.Layout{}
	for i := range boot.E820Max {
		many = append(many, guestmem.RegionSpec{GPA: guestmem.GuestAddress(4*kGiB + uint64(i)*2*kMiB), Size: kMiB})
	}
	for _, c := range []struct {
		name   string
		layout guestmem.Layout
	}{
		{"RAM in the PCI hole", guestmem.Layout{{GPA: 0, Size: 64 * kMiB}, {GPA: 3 * kGiB, Size: 4096}}},
		{"RAM across the PCI hole's end", guestmem.Layout{{GPA: 4*kGiB - 4096, Size: 8192}}},
		{"RAM across the PCI hole's start", guestmem.Layout{{GPA: 0, Size: 3*kGiB + 4096}}},
		{"overlapping regions", guestmem.Layout{{GPA: 0, Size: 64 * kMiB}, {GPA: 32 * kMiB, Size: 64 * kMiB}}},
		{"empty", guestmem.Layout{}},
		{"more entries than boot_params holds", many},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := boot.MemoryMap(c.layout)
			require.ErrorIs(t, err, boot.ErrLayout)
			t.Log(err)
		})
	}
}
