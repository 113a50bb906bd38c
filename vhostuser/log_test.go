package vhostuser_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/vhostuser"
)

// Regions that start inside a 64-page word of the log: the bits the back
// end sets come back for the right region at the right page, across word
// boundaries, and a long run marked at once is reported whole.
func TestLogBitsOfUnalignedRegions(t *testing.T) {
	l := guestmem.Layout{{GPA: 0x3000, Size: 1 * mib}, {GPA: 0x103000 + 0x5000, Size: 1 * mib}}
	m := newMemory(t, l, guestmem.WithMemfd())
	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	f, b := inProcess(t, vhostuser.BackendConfig{})
	e, err := vhostuser.Export(m, f)
	require.NoError(t, err)
	defer e.Close()
	require.NoError(t, e.EnableDirtyLog())
	mm := b.Memory()

	writes := []uint64{0x3000, 0x3fff8, 0x40000, 0x43000, 0x102000, 0x108000, 0x13f000, 0x140000, 0x207000}
	for _, a := range writes {
		require.NoError(t, write64(mm, a, a))
	}
	d, err := m.CollectDirty()
	require.NoError(t, err)
	require.Equal(t, pagesOf(writes...), spans(d))

	// A run of 200 pages from inside a word, in the second region.
	require.NoError(t, mm.MarkDirty(0x110000+0x800, 200*page))
	d, err = m.CollectDirty()
	require.NoError(t, err)
	require.Equal(t, []guestmem.Span{{GPA: 0x110000, Size: 201 * page}}, spans(d))

	require.ErrorIs(t, mm.MarkDirty(64*gib, 8), vhostuser.ErrNoLog)
	_, err = mm.WriteAt(make([]byte, 8), 0x1000)
	require.ErrorIs(t, err, vhostuser.ErrNoRegion, "below the first region")
	_, err = mm.Translate(0x103000-8, 16)
	require.ErrorIs(t, err, vhostuser.ErrNoRegion, "across the end of a region")
}
