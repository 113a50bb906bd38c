package arena_test

import (
	"os"
	"strconv"
	"strings"
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
func stats(t testing.TB, m *arena.Mapping, off, n int64) arena.Stats {
	t.Helper()
	st, err := m.StatsRange(off, n)
	require.NoError(t, err)
	require.NotEmpty(t, st.VMAs)
	return st
}

// needHugetlbPages skips unless the 2 MiB hugetlb pool has n free pages.
// .ci/run sets up such a pool; on a developer machine:
// echo 64 > /proc/sys/vm/nr_hugepages.
func needHugetlbPages(t testing.TB, n int) {
	t.Helper()
	b, err := os.ReadFile("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
	if err != nil {
		t.Skipf("no 2 MiB hugetlb pool on this host: %v", err)
	}
	free, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if free < n {
		t.Skipf("hugetlb pool has %d free 2 MiB pages, test needs %d (echo 64 > /proc/sys/vm/nr_hugepages)", free, n)
	}
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
