package arena_test

import (
	"math"
	"os"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
)

// TestBadFDsAreRefusedBeforeMapping passes every kind of fd that cannot back
// a mapping to each fd-taking entry point. Each must be refused with an error
// matching ErrBadFD and the errno mmap would have given (crosvm returns
// EBADF for a negative fd), and nothing may be mapped: NewFromFD(-1, ...) once
// mapped shared anonymous memory instead.
func TestBadFDsAreRefusedBeforeMapping(t *testing.T) {
	const closedFD = 1 << 20 // far above any open fd: EBADF, and never reused by another test's fd
	r, _, err := pipe(t)
	require.NoError(t, err)
	dir, err := unix.Open(t.TempDir(), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(dir) })
	socks, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(socks[0]); unix.Close(socks[1]) })
	pathFD, err := unix.Open("/proc/self/exe", unix.O_PATH|unix.O_CLOEXEC, 0)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(pathFD) })

	for _, tc := range []struct {
		name  string
		fd    int
		errno unix.Errno // what mmap itself answers for such an fd
	}{
		{"fd -1", -1, unix.EBADF},
		{"fd -2", -2, unix.EBADF},
		{"fd MinInt32", math.MinInt32, unix.EBADF},
		{"closed fd", closedFD, unix.EBADF},
		{"O_PATH fd", pathFD, unix.EBADF},
		{"pipe", int(r.Fd()), unix.ENODEV},
		{"directory", dir, unix.ENODEV},
		{"socket", socks[0], unix.ENODEV},
	} {
		t.Run(tc.name, func(t *testing.T) {
			check := func(t *testing.T, err error) {
				t.Helper()
				require.ErrorIs(t, err, arena.ErrBadFD)
				require.ErrorIs(t, err, tc.errno)
			}
			t.Run("NewFromFD", func(t *testing.T) {
				// Read-only, private: no access-mode rule can be what refuses it.
				for _, opts := range [][]arena.Option{
					{arena.WithProtection(arena.ProtRead), arena.Private()},
					{},
				} {
					m, err := arena.NewFromFD(tc.fd, 0, page, opts...)
					if m != nil {
						m.Close()
					}
					check(t, err)
					require.Nil(t, m)
				}
			})
			t.Run("AddFDMapping", func(t *testing.T) {
				a := newArena(t, 16*page)
				require.NoError(t, a.AddAnonMapping(0, 4*page, arena.ProtRead))
				for _, opts := range [][]arena.Option{{arena.Private()}, {arena.Replace()}} {
					check(t, a.AddFDMapping(8*page, page, tc.fd, 0, arena.ProtRead, opts...))
					check(t, a.AddFDMapping(2*page, page, tc.fd, 0, arena.ProtRead, opts...)) // over a mapping
				}
				require.Len(t, a.Mappings(), 1, "nothing was mapped or replaced")
				require.Equal(t, "---p", mapsPerms(t, a.Addr()+8*uintptr(page)))
				require.Equal(t, "r--s", mapsPerms(t, a.Addr()+2*uintptr(page)))
			})
		})
	}
}

// TestFDAccessModeIsCheckedBeforeMapping: an fd whose open mode cannot give
// the mapping asked for is ErrBadFD with mmap's EACCES, before mmap is tried.
func TestFDAccessModeIsCheckedBeforeMapping(t *testing.T) {
	path := t.TempDir() + "/ram"
	require.NoError(t, os.WriteFile(path, make([]byte, page), 0o600))
	open := func(flags int) int {
		fd, err := unix.Open(path, flags|unix.O_CLOEXEC, 0)
		require.NoError(t, err)
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	wo, ro := open(unix.O_WRONLY), open(unix.O_RDONLY)
	for _, tc := range []struct {
		name string
		fd   int
		opts []arena.Option
		ok   bool
	}{
		{"write-only", wo, []arena.Option{arena.WithProtection(arena.ProtRead)}, false},
		{"read-only, shared writable", ro, nil, false},
		{"read-only, private writable", ro, []arena.Option{arena.Private()}, true},
		{"read-only, shared read-only", ro, []arena.Option{arena.WithProtection(arena.ProtRead)}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := arena.NewFromFD(tc.fd, 0, page, tc.opts...)
			if tc.ok {
				require.NoError(t, err)
				require.NoError(t, m.Close())
				return
			}
			require.ErrorIs(t, err, arena.ErrBadFD)
			require.ErrorIs(t, err, unix.EACCES)
			require.Nil(t, m)
		})
	}
}
