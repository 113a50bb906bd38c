package guestmem_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/procfs"
)

// regionVMAs returns smaps' records of a region's memory areas.
func regionVMAs(t testing.TB, r guestmem.Region) []procfs.VMA {
	t.Helper()
	vmas, err := procfs.SmapsRange(r.HostAddr, r.HostAddr+uintptr(r.Size))
	require.NoError(t, err)
	require.NotEmpty(t, vmas)
	return vmas
}

// mergeable reports whether every memory area of r has VmFlags "mg".
func mergeable(t testing.TB, r guestmem.Region) bool {
	t.Helper()
	for _, v := range regionVMAs(t, r) {
		if !v.HasFlag("mg") {
			return false
		}
	}
	return true
}

// ksmBytes is smaps' KSM: bytes of r merged.
func ksmBytes(t testing.TB, r guestmem.Region) int64 {
	t.Helper()
	var n int64
	for _, v := range regionVMAs(t, r) {
		n += v.KSM
	}
	return n
}

// Merging is off by default; WithKSM turns it on for every region, hot-added
// ones too; UseKSM and NoKSM switch spans; backings KSM never merges are
// refused, naming the limit.
func TestKSMFlags(t *testing.T) {
	l := guestmem.Layout{{GPA: 0, Size: 4 * mib}, {GPA: 8 * mib, Size: 4 * mib}}
	m := newMemory(t, l)
	for _, r := range m.Regions() {
		require.False(t, mergeable(t, r), "region %v mergeable by default", r.GPA)
	}
	require.NoError(t, m.UseKSM(guestmem.Span{GPA: 8 * mib, Size: 4 * mib}))
	require.False(t, mergeable(t, m.Regions()[0]))
	require.True(t, mergeable(t, m.Regions()[1]))
	require.NoError(t, m.NoKSM())
	require.False(t, mergeable(t, m.Regions()[1]))
	require.ErrorIs(t, m.UseKSM(guestmem.Span{GPA: 4 * mib, Size: 4096}), guestmem.ErrHole)

	k := newMemory(t, l, guestmem.WithKSM())
	for _, r := range k.Regions() {
		require.True(t, mergeable(t, r), "region %v", r.GPA)
	}
	hot, err := k.AddRegion(guestmem.RegionSpec{GPA: 32 * mib, Size: 2 * mib})
	require.NoError(t, err)
	require.True(t, mergeable(t, hot), "a hot-added region under WithKSM")

	_, err = guestmem.New(l, guestmem.WithMemfd(), guestmem.WithKSM())
	require.ErrorIs(t, err, guestmem.ErrBacking)
	require.ErrorContains(t, err, "KSM merges only private anonymous pages")
	memfd := newMemory(t, l, guestmem.WithMemfd())
	require.ErrorIs(t, memfd.UseKSM(), guestmem.ErrBacking)
	require.NoError(t, memfd.NoKSM())
	_, err = guestmem.RestoreLazy(context.Background(), []*os.File{os.Stdin}, guestmem.WithKSM())
	require.ErrorIs(t, err, guestmem.ErrBadOption)

	require.NoError(t, k.Close())
	require.ErrorIs(t, k.UseKSM(), guestmem.ErrClosed)
	require.ErrorIs(t, k.NoKSM(), guestmem.ErrClosed)
}

const ksmDir = "/sys/kernel/mm/ksm"

// ksmSet writes v to the KSM setting name and restores what it held when
// the test ends, pass or fail.
func ksmSet(t *testing.T, name, v string) {
	t.Helper()
	path := filepath.Join(ksmDir, name)
	old, err := os.ReadFile(path)
	require.NoError(t, err)
	prev := strings.TrimSpace(string(old))
	if name == "advisor_mode" { // "[none] scan-time": the bracketed one is set
		i, j := strings.IndexByte(prev, '['), strings.IndexByte(prev, ']')
		require.True(t, i >= 0 && j > i, "advisor_mode %q", prev)
		prev = prev[i+1 : j]
	}
	t.Cleanup(func() {
		if err := os.WriteFile(path, []byte(prev), 0); err != nil {
			t.Errorf("restoring %s to %s: %v", path, prev, err)
		}
	})
	require.NoError(t, os.WriteFile(path, []byte(v), 0), "writing %s to %s", v, path)
}

func ksmCounter(t *testing.T, name string) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(ksmDir, name))
	require.NoError(t, err)
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	require.NoError(t, err)
	return v
}

// With ksmd running, identical guest pages written through guestmem's
// accessors merge (the region's smaps KSM bytes and the host's
// pages_sharing grow); a write to one merged page afterwards reads back as
// written, leaves the pages it shared with unchanged, and unshares only that
// page; NoKSM unmerges the rest. Every KSM setting the test changes is put
// back when it ends.
func TestKSMMergesIdenticalGuestPages(t *testing.T) {
	if _, err := os.Stat(ksmDir); err != nil {
		t.Skipf("this kernel has no KSM (CONFIG_KSM): %v", err)
	}
	if os.Geteuid() != 0 {
		t.Skip("starting ksmd needs root (writing /sys/kernel/mm/ksm/run)")
	}
	const pages = 512 // 2 MiB of identical pages, in a 16 MiB guest
	page := int64(os.Getpagesize())
	m := newMemory(t, guestmem.Layout{{GPA: 0, Size: 16 * mib}}, guestmem.WithKSM(), guestmem.WithoutHugepages())
	r := m.Regions()[0]
	require.True(t, mergeable(t, r))
	same := bytes.Repeat([]byte("same page "), int(page)/10+1)[:page]
	for i := range int64(pages) {
		_, err := m.WriteAt(same, i*page)
		require.NoError(t, err)
	}
	require.Zero(t, ksmBytes(t, r), "merged before ksmd ran")
	// The same pages in a guest without WithKSM: never merged.
	plain := newMemory(t, guestmem.Layout{{GPA: 0, Size: 4 * mib}}, guestmem.WithoutHugepages())
	for i := range int64(pages) {
		_, err := plain.WriteAt(same, i*page)
		require.NoError(t, err)
	}

	t.Logf("before: pages_sharing %d (as of ksmd's last scan)", ksmCounter(t, "pages_sharing"))
	if _, err := os.Stat(filepath.Join(ksmDir, "advisor_mode")); err == nil {
		ksmSet(t, "advisor_mode", "none") // the advisor would tune pages_to_scan itself
	}
	ksmSet(t, "pages_to_scan", "5000")
	ksmSet(t, "sleep_millisecs", "10")
	ksmSet(t, "run", "1")

	deadline := time.Now().Add(60 * time.Second)
	for ksmBytes(t, r) < (pages-1)*page {
		if time.Now().After(deadline) {
			t.Fatalf("ksmd merged %d of the %d identical guest pages within 60s (full_scans %d, pages_sharing %d)",
				ksmBytes(t, r)/page, pages, ksmCounter(t, "full_scans"), ksmCounter(t, "pages_sharing"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	merged := ksmBytes(t, r)
	// ksmd updates its counters as it scans: wait for a full scan after the
	// merge, then pages_shared (the copies kept: one per max_page_sharing
	// pages) and pages_sharing (the pages mapping them) count the guest's.
	for scans := ksmCounter(t, "full_scans"); ksmCounter(t, "full_scans") <= scans; {
		if time.Now().After(deadline) {
			t.Fatalf("ksmd finished no full scan within 60s after merging")
		}
		time.Sleep(20 * time.Millisecond)
	}
	shared, sharing := ksmCounter(t, "pages_shared"), ksmCounter(t, "pages_sharing")
	require.GreaterOrEqual(t, shared+sharing, int64(pages),
		"the host's pages_shared (%d) and pages_sharing (%d) do not count the guest's merged pages", shared, sharing)
	require.Greater(t, sharing, int64(pages/2))
	require.Zero(t, ksmBytes(t, plain.Regions()[0]), "a guest without WithKSM was merged")
	t.Logf("merged: %d KiB of the region (smaps KSM); pages_shared %d, pages_sharing %d", merged>>10, shared, sharing)

	mine := bytes.Repeat([]byte{0x5a}, int(page))
	_, err := m.WriteAt(mine, 7*page)
	require.NoError(t, err)
	got := make([]byte, page)
	_, err = m.ReadAt(got, 7*page)
	require.NoError(t, err)
	require.Equal(t, mine, got, "a write to a merged page did not read back")
	for _, i := range []int64{0, 6, 8, pages - 1} {
		_, err = m.ReadAt(got, i*page)
		require.NoError(t, err)
		require.Equal(t, same, got, "page %d, merged with the written one, changed", i)
	}
	require.Equal(t, merged-page, ksmBytes(t, r), "the write should unshare exactly its page")

	require.NoError(t, m.NoKSM())
	require.False(t, mergeable(t, r))
	require.Zero(t, ksmBytes(t, r), "NoKSM left pages merged")
	_, err = m.ReadAt(got, 3*page)
	require.NoError(t, err)
	require.Equal(t, same, got)
}
