package vhostuser_test

import (
	"maps"
	"net"
	"os"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/vhostuser"
)

const (
	mib  = 1 << 20
	gib  = 1 << 30
	page = 4096
)

// socketpair returns both ends of a unix stream socket as os.Files.
func socketpair(t testing.TB) (*os.File, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	return os.NewFile(uintptr(fds[0]), "front"), os.NewFile(uintptr(fds[1]), "back")
}

// unixConn makes f a *net.UnixConn (a dup of it) and closes f.
func unixConn(t testing.TB, f *os.File) *net.UnixConn {
	t.Helper()
	c, err := net.FileConn(f)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	return c.(*net.UnixConn)
}

// pipe returns a Frontend-side and a Backend-side connection.
func connPair(t testing.TB) (*net.UnixConn, *net.UnixConn) {
	a, b := socketpair(t)
	return unixConn(t, a), unixConn(t, b)
}

// inProcess starts a Backend serving in a goroutine and a Frontend talking
// to it; both are closed at cleanup, and Serve must end without error.
func inProcess(t testing.TB, cfg vhostuser.BackendConfig) (*vhostuser.Frontend, *vhostuser.Backend) {
	t.Helper()
	fc, bc := connPair(t)
	b := vhostuser.NewBackend(bc, cfg)
	done := make(chan error, 1)
	go func() { done <- b.Serve() }()
	f, err := vhostuser.NewFrontend(fc)
	require.NoError(t, err)
	t.Cleanup(func() {
		require.NoError(t, f.Close())
		require.NoError(t, <-done)
		require.NoError(t, b.Close())
	})
	return f, b
}

func newMemory(t testing.TB, l guestmem.Layout, opts ...guestmem.Option) *guestmem.Memory {
	t.Helper()
	m, err := guestmem.New(l, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	return m
}

// spans lists a dirty set's ranges.
func spans(d *guestmem.DirtySet) []guestmem.Span {
	var out []guestmem.Span
	for s := range d.Ranges() {
		out = append(out, s)
	}
	return out
}

// pagesOf returns the dirty set made of the 4 KiB pages holding addrs, as
// sorted, coalesced spans.
func pagesOf(addrs ...uint64) []guestmem.Span {
	set := map[uint64]bool{}
	for _, a := range addrs {
		set[a/page*page] = true
	}
	var out []guestmem.Span
	for _, p := range slices.Sorted(maps.Keys(set)) {
		if n := len(out); n > 0 && uint64(out[n-1].GPA)+out[n-1].Size == p {
			out[n-1].Size += page
			continue
		}
		out = append(out, guestmem.Span{GPA: guestmem.GuestAddress(p), Size: page})
	}
	return out
}
