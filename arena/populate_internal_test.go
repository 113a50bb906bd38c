package arena

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// TestPopulateFallbackTouchesEveryPage forces the path taken on kernels
// without MADV_POPULATE_WRITE (before 5.14) and checks it with mincore, and
// that a write-populate keeps data already there.
func TestPopulateFallbackTouchesEveryPage(t *testing.T) {
	populateSupported() // settle the probe, then pretend it failed
	saved := populateOK
	populateOK = false
	t.Cleanup(func() { populateOK = saved })

	const size = 4 << 20
	for _, mode := range []PopulateMode{PopulateWrite, PopulateRead} {
		m, err := NewAnon(size, Private())
		require.NoError(t, err)
		require.NoError(t, m.WriteUint64(8*pageSize+16, 0x1234))
		require.NoError(t, m.Populate(0, size, mode))
		n, err := m.ResidentBytes(0, size)
		require.NoError(t, err)
		require.Equal(t, int64(size), n)
		v, err := m.ReadUint64(8*pageSize + 16)
		require.NoError(t, err)
		require.Equal(t, uint64(0x1234), v)
		require.NoError(t, m.Close())
	}

	// A fault while touching (here a PROT_NONE page) is an error naming the page.
	m, err := NewAnon(4 * pageSize)
	require.NoError(t, err)
	defer m.Close()
	require.NoError(t, m.Protect(2*pageSize, pageSize, ProtNone))
	err = m.Populate(0, 4*pageSize, PopulateWrite)
	require.ErrorIs(t, err, ErrFault)
	var fe *FaultError
	require.ErrorAs(t, err, &fe)
	require.Equal(t, 2*pageSize, fe.Offset)

	// So is a write touch of a read-only page, which can be read: under
	// -race the touch once ran in the race detector's C runtime, where this
	// fault killed the process.
	ro, err := NewAnon(4*pageSize, WithProtection(ProtRead))
	require.NoError(t, err)
	defer ro.Close()
	require.NoError(t, ro.Populate(0, 4*pageSize, PopulateRead))
	err = ro.Populate(pageSize, 3*pageSize, PopulateWrite)
	require.ErrorIs(t, err, ErrFault)
	require.ErrorAs(t, err, &fe)
	require.Equal(t, pageSize, fe.Offset)
}
