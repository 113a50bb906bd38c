package guestmem_test

import (
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/procfs"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

// withSwap makes sure the host has swap for the test: it adds a swap file
// (root only) when there is none, and removes it at cleanup.
func withSwap(t *testing.T) {
	t.Helper()
	if b, err := os.ReadFile("/proc/swaps"); err == nil && bytes.Count(b, []byte("\n")) > 1 {
		return
	}
	if os.Getuid() != 0 {
		testenv.Skip(t, "no swap on this host, and adding a swap file needs root")
	}
	p := filepath.Join(t.TempDir(), "swapfile")
	f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, 0o600)
	require.NoError(t, err)
	// A swap file must have no holes: write it.
	_, err = f.Write(make([]byte, 64<<20))
	require.NoError(t, err)
	require.NoError(t, f.Close())
	if out, err := exec.Command("mkswap", p).CombinedOutput(); err != nil {
		testenv.Skip(t, "mkswap: %v: %s", err, out)
	}
	if out, err := exec.Command("swapon", p).CombinedOutput(); err != nil {
		testenv.Skip(t, "swapon %s: %v: %s (a container may forbid it)", p, err, out)
	}
	t.Cleanup(func() {
		out, err := exec.Command("swapoff", p).CombinedOutput()
		require.NoError(t, err, "swapoff: %s", out)
	})
}

// A full Save of anonymous memory keeps pages that are in swap: the scan
// reads pagemap's swapped bit. mincore, which it used before, reports a
// swapped page absent once it has left the swap cache, and the page was then
// restored as zeros. MADV_PAGEOUT here leaves the written pages in the swap
// cache, where mincore still sees them, so this end-to-end test passes with
// either scan; TestPopulatedRunsKeepSwappedPages tests the presence logic on
// swap entries directly.
func TestSaveKeepsSwappedOutPages(t *testing.T) {
	withSwap(t)
	m := newMemory(t, guestmem.Layout{{GPA: 0, Size: 8 * mib}, {GPA: 16 * mib, Size: 4 * mib}},
		guestmem.WithoutHugepages())
	scribble(t, m, 0x77)
	want := image(t, m)

	pm, err := procfs.OpenPagemap()
	require.NoError(t, err)
	defer pm.Close()
	swapped := 0
	for _, r := range m.Regions() {
		b, err := m.Slice(r.GPA, r.Size)
		require.NoError(t, err)
		require.NoError(t, unix.Madvise(b, unix.MADV_PAGEOUT))
		e := make([]uint64, r.Size/4096)
		require.NoError(t, pm.Read(r.HostAddr, 4096, e))
		for _, v := range e {
			if v&procfs.PageSwapped != 0 {
				swapped++
			}
		}
	}
	if swapped == 0 {
		testenv.Skip(t, "MADV_PAGEOUT moved no page to swap on this host")
	}
	t.Logf("%d guest pages in swap", swapped)

	var snap bytes.Buffer
	_, err = m.Save(context.Background(), &snap, guestmem.SaveOptions{})
	require.NoError(t, err)
	r, err := guestmem.Restore(context.Background(), []io.Reader{&snap})
	require.NoError(t, err)
	defer r.Close()
	require.True(t, bytes.Equal(want, image(t, r)), "every swapped-out page is in the snapshot")
}
