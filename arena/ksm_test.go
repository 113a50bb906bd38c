package arena_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/arena"
)

// UseKSM marks private memory mergeable (smaps VmFlags "mg") and NoKSM
// unmarks it; shared and hugetlb memory, which KSM never merges, is
// refused rather than silently accepted as the kernel does.
func TestUseKSMFlags(t *testing.T) {
	m, err := arena.NewAnon(8*page, arena.Private())
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	st, err := m.Stats()
	require.NoError(t, err)
	require.False(t, st.AnyFlag("mg"), "mergeable by default")

	require.NoError(t, m.UseKSM(0, 4*page))
	st, err = m.StatsRange(0, 4*page)
	require.NoError(t, err)
	require.True(t, st.HasFlag("mg"), "VmFlags %v", st.VMAs)
	st, err = m.StatsRange(4*page, 4*page)
	require.NoError(t, err)
	require.False(t, st.AnyFlag("mg"), "the rest of the mapping became mergeable")

	require.NoError(t, m.NoKSM(0, 4*page))
	st, err = m.Stats()
	require.NoError(t, err)
	require.False(t, st.AnyFlag("mg"))

	shared, err := arena.NewAnon(4 * page)
	require.NoError(t, err)
	t.Cleanup(func() { shared.Close() })
	require.ErrorIs(t, shared.UseKSM(0, 4*page), arena.ErrNotMergeable)
	require.NoError(t, shared.NoKSM(0, 4*page), "unmerging what never merged is harmless")

	require.ErrorIs(t, m.UseKSM(0, 0), arena.ErrZeroSize)
	require.ErrorIs(t, m.UseKSM(page/2, page), arena.ErrUnaligned)
	require.NoError(t, m.Close())
	require.ErrorIs(t, m.UseKSM(0, page), arena.ErrClosed)
	require.ErrorIs(t, m.NoKSM(0, page), arena.ErrClosed)
}
