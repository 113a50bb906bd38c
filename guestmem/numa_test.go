package guestmem_test

import (
	"context"
	"io"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/procfs"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

// numaMapsOf returns what numa_maps says of the memory areas of a region:
// their policies (one per area) and the pages on each node, summed.
func numaMapsOf(t testing.TB, r guestmem.Region) (policies []string, nodes map[int]int64) {
	t.Helper()
	vmas, err := procfs.NumaMapsRange(r.HostAddr, r.HostAddr+uintptr(r.Size))
	require.NoError(t, err)
	require.NotEmpty(t, vmas, "no numa_maps record in region %v", r.GPA)
	nodes = map[int]int64{}
	for _, v := range vmas {
		policies = append(policies, v.Policy)
		for n, p := range v.Nodes {
			nodes[n] += p
		}
	}
	return policies, nodes
}

var numaLayout = guestmem.Layout{{GPA: 0, Size: 8 * mib}, {GPA: 16 * mib, Size: 8 * mib}}

// Each policy given to all of guest RAM is what the kernel reports for every
// region (numa_maps, get_mempolicy), before and after Prefault, and Prefault
// puts every page on node 0, by numa_maps, get_mempolicy(MPOL_F_NODE) and
// move_pages (NodePages).
func TestWithNUMANode0(t *testing.T) {
	page := uint64(os.Getpagesize())
	for _, backing := range []struct {
		name string
		opt  guestmem.Option
	}{{"anonymous", guestmem.WithAnonymous()}, {"memfd", guestmem.WithMemfd()}} {
		for _, tc := range []struct {
			policy guestmem.NUMAPolicy
			word   string
		}{
			{guestmem.NUMABind(0), "bind:0"},
			{guestmem.NUMAPreferred(0), "prefer:0"},
			{guestmem.NUMAInterleave(0), "interleave:0"},
		} {
			t.Run(backing.name+"/"+tc.word, func(t *testing.T) {
				m := newMemory(t, numaLayout, backing.opt, guestmem.WithNUMA(tc.policy))
				for _, r := range m.Regions() {
					policies, nodes := numaMapsOf(t, r)
					require.Equal(t, []string{tc.word}, policies)
					require.Empty(t, nodes, "pages present before Prefault")
					p, err := m.NUMAPolicyAt(r.GPA + 5*guestmem.GuestAddress(page))
					require.NoError(t, err)
					require.Equal(t, tc.word, p.String())
				}
				require.NoError(t, m.Prefault(context.Background(), guestmem.PrefaultOptions{}))
				for _, r := range m.Regions() {
					policies, nodes := numaMapsOf(t, r)
					require.Equal(t, []string{tc.word}, policies)
					require.Equal(t, map[int]int64{0: int64(r.Size / page)}, nodes)
					require.Equal(t, 0, testenv.NodeOfPage(t, r.HostAddr+uintptr(r.Size)-uintptr(page)))
				}
				got, err := m.NodePages()
				require.NoError(t, err)
				require.Equal(t, map[int]uint64{0: m.Size()}, got)
			})
		}
	}
}

// A policy for a span gives that part of guest RAM its own policy over a
// policy for all of it; the rest keeps the general one, and a span may name
// guest-physical memory that AddRegion adds later.
func TestWithNUMASpansAndHotplug(t *testing.T) {
	hot := guestmem.RegionSpec{GPA: 64 * mib, Size: 4 * mib}
	m := newMemory(t, numaLayout,
		guestmem.WithNUMA(guestmem.NUMAPreferred(0)),
		guestmem.WithNUMA(guestmem.NUMABind(0), guestmem.Span{GPA: 20 * mib, Size: 4 * mib}),
		guestmem.WithNUMA(guestmem.NUMAInterleave(0), guestmem.Span{GPA: hot.GPA, Size: hot.Size}))
	regions := m.Regions()
	policies, _ := numaMapsOf(t, regions[0])
	require.Equal(t, []string{"prefer:0"}, policies)
	policies, _ = numaMapsOf(t, regions[1])
	require.Equal(t, []string{"prefer:0", "bind:0"}, policies, "the span's policy covers its half only")

	r, err := m.AddRegion(hot)
	require.NoError(t, err)
	policies, _ = numaMapsOf(t, r)
	require.Equal(t, []string{"interleave:0"}, policies)
	r, err = m.AddRegion(guestmem.RegionSpec{GPA: 128 * mib, Size: 2 * mib})
	require.NoError(t, err)
	policies, _ = numaMapsOf(t, r)
	require.Equal(t, []string{"prefer:0"}, policies, "a hot-added region outside every span takes the general policy")
	require.NoError(t, m.Prefault(context.Background(), guestmem.PrefaultOptions{}))
	got, err := m.NodePages(guestmem.Span{GPA: hot.GPA, Size: hot.Size})
	require.NoError(t, err)
	require.Equal(t, map[int]uint64{0: hot.Size}, got)
}

// Every refused policy is refused by New before anything is mapped or
// opened: no guest mapping and no fd is left behind.
func TestWithNUMAErrors(t *testing.T) {
	fake := testenv.DefaultFakeHost()
	fake.NUMA["node1"] = "Node 1 MemTotal:       0 kB\nNode 1 MemFree:        0 kB\n" // a CPU-only node
	root := fake.FS()
	for _, tc := range []struct {
		name string
		opts []guestmem.Option
		want error
		text string
	}{
		{"nonexistent node", []guestmem.Option{guestmem.WithNUMA(guestmem.NUMABind(63))}, guestmem.ErrNUMANode,
			"node 63: no such NUMA node"},
		{"nonexistent in a span", []guestmem.Option{guestmem.WithMemfd(),
			guestmem.WithNUMA(guestmem.NUMAPreferred(63), guestmem.Span{GPA: 0, Size: 2 * mib})},
			guestmem.ErrNUMANode, "nodes with memory: 0"},
		{"memoryless node", []guestmem.Option{guestmem.WithNodeRoot(root), guestmem.WithNUMA(guestmem.NUMAInterleave(0, 1))},
			guestmem.ErrNUMANode, "node 1: NUMA node has no memory"},
		{"no node", []guestmem.Option{guestmem.WithNUMA(guestmem.NUMABind())}, guestmem.ErrBadOption, "names no node"},
		{"empty span", []guestmem.Option{guestmem.WithNUMA(guestmem.NUMABind(0), guestmem.Span{GPA: 0})},
			guestmem.ErrZeroSize, ""},
		{"misaligned span", []guestmem.Option{guestmem.WithNUMA(guestmem.NUMABind(0), guestmem.Span{GPA: 1, Size: 4096})},
			guestmem.ErrUnaligned, ""},
		{"span past the top", []guestmem.Option{guestmem.WithNUMA(guestmem.NUMABind(0),
			guestmem.Span{GPA: guestmem.MaxGuestAddress, Size: 4096})}, guestmem.ErrAddressOverflow, ""},
		{"overlapping spans", []guestmem.Option{
			guestmem.WithNUMA(guestmem.NUMABind(0), guestmem.Span{GPA: 0, Size: 4 * mib}),
			guestmem.WithNUMA(guestmem.NUMAPreferred(0), guestmem.Span{GPA: 2 * mib, Size: 4 * mib})},
			guestmem.ErrBadOption, "overlap"},
		{"two for all", []guestmem.Option{guestmem.WithNUMA(guestmem.NUMABind(0)), guestmem.WithNUMA(guestmem.NUMABind(0))},
			guestmem.ErrBadOption, "two WithNUMA"},
		{"file backing", []guestmem.Option{guestmem.WithFile(os.Stdin), guestmem.WithNUMA(guestmem.NUMABind(0))},
			guestmem.ErrBadOption, "page cache"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			maps, fds := testenv.GuestMappings(t), testenv.OpenFDs(t)
			m, err := guestmem.New(numaLayout, tc.opts...)
			require.ErrorIs(t, err, tc.want)
			require.Nil(t, m)
			require.ErrorContains(t, err, tc.text)
			require.Equal(t, maps, testenv.GuestMappings(t), "New mapped guest memory before refusing")
			require.Equal(t, fds, testenv.OpenFDs(t), "New opened an fd before refusing")
		})
	}
	// The fake host's node 0 has memory: the same option is accepted there.
	newMemory(t, numaLayout, guestmem.WithNodeRoot(root), guestmem.WithNUMA(guestmem.NUMABind(0)))

	_, err := guestmem.RestoreLazy(context.Background(), []*os.File{os.Stdin}, guestmem.WithNUMA(guestmem.NUMABind(0)))
	require.ErrorIs(t, err, guestmem.ErrBadOption)

	m, err := guestmem.New(numaLayout, guestmem.WithNUMA(guestmem.NUMABind(0)))
	require.NoError(t, err)
	_, err = m.NUMAPolicyAt(8 * mib)
	require.ErrorIs(t, err, guestmem.ErrHole)
	_, err = m.NodePages(guestmem.Span{GPA: 1, Size: 4096})
	require.ErrorIs(t, err, guestmem.ErrUnaligned)
	require.NoError(t, m.Close())
	_, err = m.NUMAPolicyAt(0)
	require.ErrorIs(t, err, guestmem.ErrClosed)
	_, err = m.NodePages()
	require.ErrorIs(t, err, guestmem.ErrClosed)
}

// Restore applies the policy before it writes the snapshot's data.
func TestRestoreWithNUMA(t *testing.T) {
	src := newMemory(t, numaLayout)
	_, err := src.WriteAt([]byte("placed"), 17*mib)
	require.NoError(t, err)
	f, err := os.CreateTemp(t.TempDir(), "snap")
	require.NoError(t, err)
	defer f.Close()
	_, err = src.Save(context.Background(), f, guestmem.SaveOptions{})
	require.NoError(t, err)
	_, err = f.Seek(0, 0)
	require.NoError(t, err)
	m, err := guestmem.Restore(context.Background(), []io.Reader{f}, guestmem.WithNUMA(guestmem.NUMABind(0)))
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	for _, r := range m.Regions() {
		policies, _ := numaMapsOf(t, r)
		require.Equal(t, []string{"bind:0"}, policies)
	}
	buf := make([]byte, 6)
	_, err = m.ReadAt(buf, 17*mib)
	require.NoError(t, err)
	require.Equal(t, "placed", string(buf))
}

// The placement calls are safe for concurrent use with accesses, Prefault
// and hotplug (run under -race).
func TestPlacementConcurrent(t *testing.T) {
	m := newMemory(t, numaLayout, guestmem.WithNUMA(guestmem.NUMAPreferred(0)), guestmem.WithKSM())
	done := make(chan struct{})
	errs := make(chan error, 8)
	run := func(f func() error) {
		go func() {
			for {
				select {
				case <-done:
					errs <- nil
					return
				default:
				}
				if err := f(); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	run(func() error { _, err := m.WriteAt([]byte("x"), 17*mib); return err })
	run(func() error { _, err := m.NUMAPolicyAt(0); return err })
	run(func() error { _, err := m.NodePages(); return err })
	run(func() error {
		if err := m.UseKSM(guestmem.Span{GPA: 0, Size: 2 * mib}); err != nil {
			return err
		}
		return m.NoKSM(guestmem.Span{GPA: 0, Size: 2 * mib})
	})
	for range 20 {
		r, err := m.AddRegion(guestmem.RegionSpec{GPA: 64 * mib, Size: 2 * mib})
		require.NoError(t, err)
		policies, _ := numaMapsOf(t, r)
		require.Equal(t, []string{"prefer:0"}, policies)
		require.NoError(t, m.Prefault(context.Background(), guestmem.PrefaultOptions{Workers: 2}))
		require.NoError(t, m.RemoveRegion(64*mib))
	}
	close(done)
	for range 4 {
		require.NoError(t, <-errs)
	}
}
