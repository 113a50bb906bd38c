//go:build amd64

package demo_test

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/demo"
	"github.com/gmem-vmm/gmem/internal/guest"
)

const (
	mib = 1 << 20
	gib = 1 << 30
)

// planSizes are the size classes gmem run accepts: every multiple of 2 MiB
// up to 1 GiB (the smallest, the uneven ones such as 6 MiB and 10 MiB, the
// powers of two, the default), the sizes around the harness's default
// system slot just below 4 GiB, and the largest.
func planSizes() []uint64 {
	var sizes []uint64
	for s := uint64(demo.MinSize); s <= gib; s += 2 * mib {
		sizes = append(sizes, s)
	}
	return append(sizes, 4026*mib, 4028*mib, 4030*mib, 4*gib, 4*gib+2*mib, 6*gib, 8064*mib, 8*gib, 8*gib+2*mib,
		16*gib, 63*gib, demo.MaxSize-2*mib, demo.MaxSize)
}

// TestPlanStaysInsideTheGuest checks, for every size class and backing,
// that every address the demo writes, sums or discards lies inside the
// guest's layout, that the system slot of the guest harness overlaps none
// of it, and that the counts the demo expects are those of the pages it
// writes.
func TestPlanStaysInsideTheGuest(t *testing.T) {
	for _, b := range []guestmem.Backing{guestmem.Anonymous, guestmem.Memfd, guestmem.Hugetlb} {
		for _, size := range planSizes() {
			p, err := demo.NewPlan(size, b)
			require.NoError(t, err, "size %d", size)
			name := fmt.Sprintf("%s %d MiB", b, size>>20)
			checkPlan(t, name, size, b, p)
			if t.Failed() {
				return // one size class is enough to read
			}
		}
	}
}

func checkPlan(t *testing.T, name string, size uint64, b guestmem.Backing, p demo.Plan) {
	t.Helper()
	l := p.Layout
	require.Len(t, l, 2, name)
	r0, r1 := l[0], l[1]
	require.NoError(t, l.Validate(2*mib, 64*gib), name)
	require.Equal(t, size, l.Size(), name)
	require.Zero(t, r0.GPA, name)
	require.Equal(t, guestmem.GuestAddress(r0.Size+64*mib), r1.GPA, "%s: a 64 MiB hole", name)
	require.True(t, r0.Size >= r1.Size && r0.Size-r1.Size <= 2*mib, "%s: regions %d and %d", name, r0.Size, r1.Size)
	end := uint64(r1.GPA) + r1.Size
	require.LessOrEqual(t, end, uint64(64*gib), "%s: guest RAM outside the harness's identity map", name)

	inside := func(r guestmem.RegionSpec, a guestmem.GuestAddress, n uint64) bool {
		return a >= r.GPA && n <= r.Size && uint64(a-r.GPA) <= r.Size-n
	}
	overlaps := func(a, n uint64, r guestmem.RegionSpec) bool {
		return a < uint64(r.GPA)+r.Size && uint64(r.GPA) < a+n
	}

	// The harness's system slot: 2 MiB-aligned, below 512 GiB, in no region.
	require.Zero(t, p.SysBase%guest.SysSize, name)
	require.Less(t, p.SysBase, uint64(512*gib), name)
	for i, r := range l {
		require.False(t, overlaps(p.SysBase, guest.SysSize, r), "%s: system slot %#x overlaps region %d", name,
			p.SysBase, i)
	}

	// Every page is written, so the first dirty count is all of them.
	require.Equal(t, size/4096, p.Pages, name)

	// The guest's writes of the dirty step: whole pages of the first region.
	g := p.GuestDirty
	require.NotZero(t, g.Size, name)
	require.Zero(t, uint64(g.GPA)%4096, name)
	require.Zero(t, g.Size%4096, name)
	require.True(t, inside(r0, g.GPA, g.Size), "%s: guest writes %v+%d outside region 0", name, g.GPA, g.Size)
	require.Equal(t, min(100, r0.Size/4096), p.GuestDirtyPages(), name)

	// The host's writes: one word each, in the second region, in pages of
	// their own and none of the guest's.
	require.Len(t, p.HostDirty, int(min(10, r1.Size/4096)), name)
	pages := map[uint64]bool{}
	for a := uint64(g.GPA); a < uint64(g.GPA)+g.Size; a += 4096 {
		pages[a/4096] = true
	}
	for _, a := range p.HostDirty {
		require.True(t, inside(r1, a, 8), "%s: host write at %v outside region 1 [%v, %v)", name, a, r1.GPA,
			r1.GPA+guestmem.GuestAddress(r1.Size))
		require.Zero(t, uint64(a)%8, name)
		require.False(t, pages[uint64(a)/4096], "%s: page of %v written twice", name, a)
		pages[uint64(a)/4096] = true
	}
	require.Equal(t, uint64(len(pages)), p.DirtyAfter(), "%s: the dirty count after the step", name)
	require.Equal(t, p.GuestDirtyPages()+uint64(len(p.HostDirty)), p.DirtyAfter(), name)

	// The balloon: inside the first region, aligned to the backing's page
	// size, a quarter of the region or at least one page.
	want := uint64(4096)
	if b == guestmem.Hugetlb {
		want = 2 * mib
	}
	require.Equal(t, want, p.PageSize, name)
	bl := p.Balloon
	require.NotZero(t, bl.Size, name)
	require.Zero(t, uint64(bl.GPA)%p.PageSize, "%s: balloon at %v", name, bl.GPA)
	require.Zero(t, bl.Size%p.PageSize, "%s: balloon of %d", name, bl.Size)
	require.True(t, inside(r0, bl.GPA, bl.Size), "%s: balloon %v+%d outside region 0", name, bl.GPA, bl.Size)
	require.Equal(t, r0.GPA+guestmem.GuestAddress(r0.Size), bl.GPA+guestmem.GuestAddress(bl.Size),
		"%s: the balloon ends the region", name)
	require.Equal(t, max(r0.Size/4/p.PageSize*p.PageSize, p.PageSize), bl.Size, name)

	require.Equal(t, 1, p.SumRegion, name)
}

// The smallest guest, an uneven one and the default, spelled out.
func TestPlanExamples(t *testing.T) {
	for _, tc := range []struct {
		size    uint64
		b       guestmem.Backing
		layout  guestmem.Layout
		stride  uint64 // pages between the host's writes
		balloon guestmem.Span
	}{
		{4 * mib, guestmem.Memfd, guestmem.Layout{{GPA: 0, Size: 2 * mib}, {GPA: 66 * mib, Size: 2 * mib}}, 51,
			guestmem.Span{GPA: 1536 << 10, Size: 512 << 10}},
		{4 * mib, guestmem.Hugetlb, guestmem.Layout{{GPA: 0, Size: 2 * mib}, {GPA: 66 * mib, Size: 2 * mib}}, 51,
			guestmem.Span{GPA: 0, Size: 2 * mib}},
		{6 * mib, guestmem.Anonymous, guestmem.Layout{{GPA: 0, Size: 4 * mib}, {GPA: 68 * mib, Size: 2 * mib}}, 51,
			guestmem.Span{GPA: 3 * mib, Size: 1 * mib}},
		{10 * mib, guestmem.Hugetlb, guestmem.Layout{{GPA: 0, Size: 6 * mib}, {GPA: 70 * mib, Size: 4 * mib}}, 64,
			guestmem.Span{GPA: 4 * mib, Size: 2 * mib}},
		{512 * mib, guestmem.Memfd, guestmem.Layout{{GPA: 0, Size: 256 * mib}, {GPA: 320 * mib, Size: 256 * mib}}, 64,
			guestmem.Span{GPA: 192 * mib, Size: 64 * mib}},
	} {
		p, err := demo.NewPlan(tc.size, tc.b)
		require.NoError(t, err)
		require.Equal(t, tc.layout, p.Layout, "%d %s", tc.size, tc.b)
		require.Equal(t, guestmem.Span{GPA: 0, Size: 100 * 4096}, p.GuestDirty)
		require.Len(t, p.HostDirty, 10)
		for i, a := range p.HostDirty {
			require.Equal(t, tc.layout[1].GPA+guestmem.GuestAddress(uint64(i)*tc.stride*4096), a)
		}
		require.Equal(t, uint64(110), p.DirtyAfter())
		require.Equal(t, tc.balloon, p.Balloon, "%d %s", tc.size, tc.b)
		require.Equal(t, uint64(tc.layout[1].GPA)+tc.layout[1].Size+2*mib, p.SysBase)
	}
}

func TestPlanRefusesSizes(t *testing.T) {
	for _, size := range []uint64{0, 2 * mib, 3 * mib, 5 * mib, 4*mib + 4096, demo.MaxSize + 2*mib, 128 * gib, 1 << 63} {
		_, err := demo.NewPlan(size, guestmem.Memfd)
		require.ErrorContains(t, err, "must be a multiple of 2 MiB from 4 MiB to 65472 MiB", "size %d", size)
		_, err = demo.Layout(size)
		require.Error(t, err, "size %d", size)
	}
}
