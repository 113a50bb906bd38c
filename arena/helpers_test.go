package arena_test

import (
	"os"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
)

var page = int64(os.Getpagesize())

// newMemfd returns a memfd of size bytes, closed when the test ends.
func newMemfd(t testing.TB, size int64) int {
	t.Helper()
	fd, err := unix.MemfdCreate(t.Name(), unix.MFD_CLOEXEC)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(fd) })
	require.NoError(t, unix.Ftruncate(fd, size))
	return fd
}

// allocatedBytes is the memory actually backing fd (st_blocks, 512-byte units).
func allocatedBytes(t testing.TB, fd int) int64 {
	t.Helper()
	var st unix.Stat_t
	require.NoError(t, unix.Fstat(fd, &st))
	return st.Blocks * 512
}

// residentPages counts resident pages of [off, off+n) with mincore.
func residentPages(t testing.TB, m *arena.Mapping, off, n int64) int {
	t.Helper()
	res, err := m.Resident(off, n)
	require.NoError(t, err)
	count := 0
	for _, r := range res {
		if r {
			count++
		}
	}
	return count
}

// stats reads smaps for [off, off+n) of m.
func stats(t testing.TB, m interface {
	StatsRange(off, n int64) (arena.Stats, error)
}, off, n int64) arena.Stats {
	t.Helper()
	st, err := m.StatsRange(off, n)
	require.NoError(t, err)
	require.NotEmpty(t, st.VMAs)
	return st
}

// mapsPerms returns the permissions of the VMA containing addr, "" if none.
func mapsPerms(t testing.TB, addr uintptr) string {
	t.Helper()
	v, _ := pmFind(pmParse(t), addr)
	return v.perms
}

// pipe returns both ends of a pipe, closed when the test ends.
func pipe(t testing.TB) (*os.File, *os.File, error) {
	t.Helper()
	r, w, err := os.Pipe()
	if err == nil {
		t.Cleanup(func() { r.Close(); w.Close() })
	}
	return r, w, err
}
