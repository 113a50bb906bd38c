package arena_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/arena"
)

// TestStatsListsTheVMAsOfTheRange maps three pieces with different
// protections into an arena, reserved gaps between them, and checks that
// StatsRange reports exactly the VMAs the range touches, in order, with
// their sizes summed.
func TestStatsListsTheVMAsOfTheRange(t *testing.T) {
	a, err := arena.New(16 * page)
	require.NoError(t, err)
	defer a.Close()
	require.NoError(t, a.AddAnonMapping(2*page, 2*page, arena.ProtReadWrite, arena.Private(), arena.PopulateOnMap()))
	require.NoError(t, a.AddAnonMapping(6*page, 3*page, arena.ProtRead, arena.Private()))
	require.NoError(t, a.AddAnonMapping(10*page, page, arena.ProtReadWrite, arena.Private(), arena.PopulateOnMap()))

	type vma struct {
		off, size int64
		perms     string
	}
	// VMAs clipped to the arena: its reserved ends may have merged with a
	// neighbour's (another arena's reservation is PROT_NONE and
	// MADV_DONTDUMP too).
	got := func(st arena.Stats) []vma {
		var out []vma
		for _, v := range st.VMAs {
			lo, hi := max(v.Start, a.Addr()), min(v.End, a.Addr()+uintptr(a.Size()))
			out = append(out, vma{int64(lo - a.Addr()), int64(hi - lo), v.Perms})
		}
		return out
	}
	st, err := a.StatsRange(3*page, 8*page) // [3, 11): part of the first piece to the end of the last
	require.NoError(t, err)
	require.Equal(t, []vma{
		{2 * page, 2 * page, "rw-p"}, {4 * page, 2 * page, "---p"}, {6 * page, 3 * page, "r--p"},
		{9 * page, page, "---p"}, {10 * page, page, "rw-p"},
	}, got(st), "VMAs are reported whole, lowest first")
	require.Equal(t, int64(3*page), st.Rss, "the populated pieces are resident, the rest is not")
	require.Equal(t, st.VMAs[0].Rss+st.VMAs[4].Rss, st.Rss)
	require.True(t, st.HasFlag("dd"))
	require.False(t, st.AnyFlag("lo"))

	st, err = a.StatsRange(12*page, page)
	require.NoError(t, err)
	require.Equal(t, []vma{{11 * page, 5 * page, "---p"}}, got(st), "a reserved range is one PROT_NONE VMA")
	require.Zero(t, st.Rss)

	st, err = a.Stats()
	require.NoError(t, err)
	require.Equal(t, []vma{
		{0, 2 * page, "---p"}, {2 * page, 2 * page, "rw-p"}, {4 * page, 2 * page, "---p"}, {6 * page, 3 * page, "r--p"},
		{9 * page, page, "---p"}, {10 * page, page, "rw-p"}, {11 * page, 5 * page, "---p"},
	}, got(st))
}

// BenchmarkStats is the cost of one Stats call on an arena of eight
// mappings (sixteen VMAs with the reserved gaps between them), and of a
// StatsRange of one page. Both read /proc/self/smaps, whose cost grows with
// the VMAs of the whole process below the range, not with the range.
func BenchmarkStats(b *testing.B) {
	const piece = 2 << 20
	a, err := arena.New(16 * piece)
	if err != nil {
		b.Fatal(err)
	}
	defer a.Close()
	for i := int64(0); i < 8; i++ {
		prot := arena.ProtReadWrite
		if i%2 == 1 {
			prot = arena.ProtRead
		}
		if err := a.AddAnonMapping(2*i*piece, piece, prot, arena.Private()); err != nil {
			b.Fatal(err)
		}
		if err := a.Populate(2*i*piece, piece, arena.PopulateRead); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("Stats", func(b *testing.B) {
		for b.Loop() {
			st, err := a.Stats()
			if err != nil {
				b.Fatal(err)
			}
			if len(st.VMAs) == 0 {
				b.Fatal("no VMAs")
			}
		}
	})
	b.Run("StatsRange/page", func(b *testing.B) {
		for b.Loop() {
			if _, err := a.StatsRange(4*piece, 4096); err != nil {
				b.Fatal(err)
			}
		}
	})
}
