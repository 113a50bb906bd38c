package arena_test

import (
	"errors"
	"fmt"
	"testing"
	"testing/fstest"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/internal/procfs"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

// numaMapsAt returns the numa_maps record of the memory area starting at
// addr.
func numaMapsAt(t testing.TB, addr uintptr) procfs.NumaVMA {
	t.Helper()
	vmas, err := procfs.NumaMapsRange(addr, addr+1)
	require.NoError(t, err)
	require.Len(t, vmas, 1, "no numa_maps record starts at %#x", addr)
	return vmas[0]
}

// Node 0 is the one node every NUMA kernel has. Each policy set on a fresh
// range is what the kernel reports afterwards (numa_maps and get_mempolicy),
// and the populated pages are on node 0 by all three of numa_maps,
// get_mempolicy(MPOL_F_NODE) and move_pages.
func TestSetNUMAPolicyNode0(t *testing.T) {
	for _, tc := range []struct {
		policy arena.NUMAPolicy
		word   string
	}{
		{arena.NUMABind(0), "bind:0"},
		{arena.NUMAPreferred(0), "prefer:0"},
		{arena.NUMAInterleave(0), "interleave:0"},
	} {
		t.Run(tc.word, func(t *testing.T) {
			const pages = 64
			m, err := arena.NewAnon(pages*page, arena.Private())
			require.NoError(t, err)
			t.Cleanup(func() { m.Close() })
			require.Equal(t, tc.word, tc.policy.String())
			require.NoError(t, m.SetNUMAPolicy(0, pages*page, tc.policy))

			got, err := m.NUMAPolicyAt(3 * page)
			require.NoError(t, err)
			require.True(t, got.Equal(tc.policy), "get_mempolicy(MPOL_F_ADDR) reports %v, want %v", got, tc.policy)

			nodes, err := m.PageNodes(0, pages*page)
			require.NoError(t, err)
			require.Equal(t, -1, nodes[0], "an untouched page is on no node")

			require.NoError(t, m.Populate(0, pages*page, arena.PopulateWrite))
			nm := numaMapsAt(t, m.Addr())
			require.Equal(t, tc.word, nm.Policy, "numa_maps: %+v", nm)
			require.Equal(t, map[int]int64{0: pages}, nm.Nodes, "numa_maps: %+v", nm)
			require.Equal(t, 0, testenv.NodeOfPage(t, m.Addr()+uintptr(5*page)))
			nodes, err = m.PageNodes(0, pages*page)
			require.NoError(t, err)
			for i, n := range nodes {
				require.Equal(t, 0, n, "page %d", i)
			}
		})
	}
}

// A policy on part of a mapping splits its memory area: the rest keeps the
// default, and a shared (memfd) mapping takes a policy too.
func TestSetNUMAPolicyPartAndShared(t *testing.T) {
	m, err := arena.NewFromFD(newMemfd(t, 8*page), 0, 8*page)
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	require.NoError(t, m.SetNUMAPolicy(4*page, 4*page, arena.NUMABind(0)))
	require.NoError(t, m.Populate(0, 8*page, arena.PopulateWrite))
	require.Equal(t, "default", numaMapsAt(t, m.Addr()).Policy)
	bound := numaMapsAt(t, m.Addr()+uintptr(4*page))
	require.Equal(t, "bind:0", bound.Policy)
	require.Equal(t, int64(4), bound.Nodes[0])

	// Back to the default.
	require.NoError(t, m.SetNUMAPolicy(4*page, 4*page, arena.NUMAPolicy{}))
	p, err := m.NUMAPolicyAt(4 * page)
	require.NoError(t, err)
	require.True(t, p.IsDefault(), "policy %v", p)
}

// Policies on nodes that cannot hold memory are refused before the kernel
// is asked, and the range keeps its policy.
func TestSetNUMAPolicyErrors(t *testing.T) {
	m, err := arena.NewAnon(4*page, arena.Private())
	require.NoError(t, err)
	require.NoError(t, m.SetNUMAPolicy(0, 4*page, arena.NUMAPreferred(0)))
	for _, tc := range []struct {
		name   string
		policy arena.NUMAPolicy
		off, n int64
		want   error
	}{
		{"nonexistent node", arena.NUMABind(63), 0, 4 * page, arena.ErrNUMANode},
		{"one of two nonexistent", arena.NUMAInterleave(0, 63), 0, 4 * page, arena.ErrNUMANode},
		{"no nodes", arena.NUMABind(), 0, 4 * page, arena.ErrBadOption},
		{"negative node", arena.NUMAPreferred(-1), 0, 4 * page, arena.ErrBadOption},
		{"node past MAX_NUMNODES", arena.NUMABind(1 << 20), 0, 4 * page, arena.ErrBadOption},
		{"empty range", arena.NUMABind(0), 0, 0, arena.ErrZeroSize},
		{"misaligned", arena.NUMABind(0), 1, page, arena.ErrUnaligned},
		{"past the end", arena.NUMABind(0), 0, 5 * page, arena.ErrOutOfRange},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := m.SetNUMAPolicy(tc.off, tc.n, tc.policy)
			require.ErrorIs(t, err, tc.want)
			p, perr := m.NUMAPolicyAt(0)
			require.NoError(t, perr)
			require.Equal(t, "prefer:0", p.String(), "a refused policy changed the range")
		})
	}
	err = m.SetNUMAPolicy(0, 4*page, arena.NUMABind(63))
	require.ErrorContains(t, err, "node 63")
	require.ErrorContains(t, err, "nodes with memory: 0")

	require.NoError(t, m.Close())
	require.ErrorIs(t, m.SetNUMAPolicy(0, 4*page, arena.NUMABind(0)), arena.ErrClosed)
	_, err = m.NUMAPolicyAt(0)
	require.ErrorIs(t, err, arena.ErrClosed)
	_, err = m.PageNodes(0, page)
	require.ErrorIs(t, err, arena.ErrClosed)
}

// In an arena, reserved ranges take no policy.
func TestSetNUMAPolicyNeedsMapped(t *testing.T) {
	a, err := arena.New(8 * page)
	require.NoError(t, err)
	t.Cleanup(func() { a.Close() })
	require.NoError(t, a.AddAnonMapping(0, 4*page, arena.ProtReadWrite, arena.Private()))
	require.ErrorIs(t, a.SetNUMAPolicy(0, 8*page, arena.NUMABind(0)), arena.ErrNotMapped)
	_, err = a.PageNodes(4*page, page)
	require.ErrorIs(t, err, arena.ErrNotMapped)
}

// Check reads the nodes from the root it is given: a node without memory
// (CPU-only) and a missing one are ErrNUMANode; a kernel without NUMA has
// no node at all.
func TestNUMAPolicyCheckFakeHost(t *testing.T) {
	root := fstest.MapFS{
		"sys/devices/system/node/node0/meminfo": {Data: []byte("Node 0 MemTotal:  1048576 kB\n")},
		"sys/devices/system/node/node0/cpulist": {Data: []byte("0-1\n")},
		"sys/devices/system/node/node1/meminfo": {Data: []byte("Node 1 MemTotal:        0 kB\n")},
		"sys/devices/system/node/node1/cpulist": {Data: []byte("2-3\n")},
	}
	require.NoError(t, arena.NUMABind(0).Check(root))
	err := arena.NUMABind(1).Check(root)
	require.ErrorIs(t, err, arena.ErrNUMANode)
	require.ErrorContains(t, err, "node 1: NUMA node has no memory")
	err = arena.NUMAInterleave(0, 2).Check(root)
	require.ErrorIs(t, err, arena.ErrNUMANode)
	require.ErrorContains(t, err, "node 2: no such NUMA node")
	err = arena.NUMAPreferred(0).Check(fstest.MapFS{})
	require.ErrorIs(t, err, arena.ErrNUMANode)
	require.ErrorContains(t, err, "a kernel without NUMA")
	require.NoError(t, arena.NUMAPolicy{}.Check(fstest.MapFS{}), "the default policy needs no node")
}

func TestNUMAPolicyString(t *testing.T) {
	for p, want := range map[string]string{
		fmt.Sprint(arena.NUMABind(3, 1, 2, 2)):    "bind:1-3",
		fmt.Sprint(arena.NUMAInterleave(0, 2, 3)): "interleave:0,2-3",
		fmt.Sprint(arena.NUMAPolicy{}):            "default",
	} {
		require.Equal(t, want, p)
	}
	require.Equal(t, []int{1, 2, 3}, arena.NUMABind(3, 1, 2).Nodes())
	require.True(t, errors.Is(arena.NUMABind(63).Check(nil), arena.ErrNUMANode))
}
