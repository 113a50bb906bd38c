package guestmem_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

const mib = 1 << 20

func newMemory(t testing.TB, l guestmem.Layout, opts ...guestmem.Option) *guestmem.Memory {
	t.Helper()
	m, err := guestmem.New(l, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	return m
}

func TestLayoutValidation(t *testing.T) {
	const top = guestmem.MaxGuestAddress
	for _, tc := range []struct {
		name string
		l    guestmem.Layout
		err  error
	}{
		{"empty", nil, guestmem.ErrEmptyLayout},
		{"zero size", guestmem.Layout{{GPA: 0, Size: 0}}, guestmem.ErrZeroSize},
		{"unaligned address", guestmem.Layout{{GPA: 100, Size: 4096}}, guestmem.ErrUnaligned},
		{"unaligned size", guestmem.Layout{{GPA: 0, Size: 4097}}, guestmem.ErrUnaligned},
		{"overlap", guestmem.Layout{{GPA: 8192, Size: 8192}, {GPA: 0, Size: 12288}}, guestmem.ErrOverlap},
		{"past the top", guestmem.Layout{{GPA: top - 4096, Size: 8192}}, guestmem.ErrOverflow},
		{"overflowing 64 bits", guestmem.Layout{{GPA: 1 << 63, Size: 1 << 63}}, guestmem.ErrOverflow},
		{"ok, unsorted, touching", guestmem.Layout{{GPA: 8192, Size: 4096}, {GPA: 0, Size: 8192}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.l.Validate(4096, top)
			if tc.err == nil {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, tc.err)
			_, err = guestmem.New(tc.l)
			require.ErrorIs(t, err, tc.err, "New validates too")
		})
	}
	var le *guestmem.LayoutError
	require.ErrorAs(t, guestmem.Layout{{GPA: 0, Size: 8192}, {GPA: 4096, Size: 4096}}.Validate(4096, top), &le)
	require.Equal(t, 1, le.Index)
	require.Equal(t, 0, le.Other)
}

func TestX86Layout(t *testing.T) {
	require.Equal(t, guestmem.Layout{{GPA: 0, Size: 512 * mib}}, guestmem.X86Layout(512*mib))
	require.Equal(t, guestmem.Layout{{GPA: 0, Size: 3 << 30}, {GPA: 4 << 30, Size: 1 << 30}},
		guestmem.X86Layout(4<<30))
	require.NoError(t, guestmem.X86Layout(8<<30).Validate(4096, guestmem.MaxGuestAddress))
}

// twoRegions is RAM at [0, 4 MiB) and [4 MiB, 6 MiB) (contiguous) and
// [16 MiB, 18 MiB) after a hole.
var twoRegions = guestmem.Layout{
	{GPA: 16 * mib, Size: 2 * mib},
	{GPA: 0, Size: 4 * mib},
	{GPA: 4 * mib, Size: 2 * mib},
}

func TestBackings(t *testing.T) {
	backings := []struct {
		name string
		opts func(t *testing.T) []guestmem.Option
		fd   bool
	}{
		{"anonymous", func(*testing.T) []guestmem.Option { return nil }, false},
		{"memfd", func(*testing.T) []guestmem.Option {
			return []guestmem.Option{guestmem.WithMemfd()}
		}, true},
		{"file", func(t *testing.T) []guestmem.Option {
			path := filepath.Join(t.TempDir(), "ram")
			data := bytes.Repeat([]byte{0x5a}, int(guestmem.FileSize(twoRegions)))
			require.NoError(t, os.WriteFile(path, data, 0o600))
			f, err := os.Open(path)
			require.NoError(t, err)
			t.Cleanup(func() { f.Close() })
			return []guestmem.Option{guestmem.WithFile(f)}
		}, true},
	}
	for _, b := range backings {
		t.Run(b.name, func(t *testing.T) {
			m := newMemory(t, twoRegions, b.opts(t)...)
			regions := m.Regions()
			require.Len(t, regions, 3)
			require.Equal(t, guestmem.GuestAddress(0), regions[0].GPA, "sorted by address")
			require.Equal(t, uint64(8*mib), m.Size())
			for i, r := range regions {
				require.Zero(t, r.HostAddr%(2*mib), "regions are 2 MiB aligned in the host")
				st := smapsFlags(t, r.HostAddr)
				require.Contains(t, st, "dd", "MADV_DONTDUMP")
				require.Contains(t, st, "dc", "MADV_DONTFORK")
				require.Contains(t, st, "hg", "transparent hugepages requested")
				// Guard gaps: the host byte after each region is reserved.
				require.Equal(t, "---p", mapsPerms(t, r.HostAddr+uintptr(r.Size)), "region %d", i)
				require.Equal(t, "---p", mapsPerms(t, r.HostAddr-1), "region %d", i)
			}
			if b.fd {
				require.GreaterOrEqual(t, m.FD(), 0)
			} else {
				require.Equal(t, -1, m.FD())
			}
		})
	}
}

func TestMemfdIsSealedAndShared(t *testing.T) {
	m := newMemory(t, twoRegions, guestmem.WithMemfd())
	err := unix.Ftruncate(m.FD(), 0)
	require.ErrorIs(t, err, unix.EPERM, "the memfd cannot shrink under the guest")
	err = unix.Ftruncate(m.FD(), 1<<30)
	require.ErrorIs(t, err, unix.EPERM, "nor grow")
	// What the VMM writes, another process mapping the fd sees: check with pread.
	require.NoError(t, m.WriteUint64(16*mib+8, 0xfeedface))
	r, err := m.Region(16 * mib)
	require.NoError(t, err)
	buf := make([]byte, 8)
	_, err = unix.Pread(m.FD(), buf, r.FDOffset+8)
	require.NoError(t, err)
	require.Equal(t, []byte{0xce, 0xfa, 0xed, 0xfe, 0, 0, 0, 0}, buf)
}

func TestFileBackingIsPrivateAndTooSmallIsAnError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ram")
	require.NoError(t, os.WriteFile(path, bytes.Repeat([]byte{7}, int(guestmem.FileSize(twoRegions))), 0o600))
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	m := newMemory(t, twoRegions, guestmem.WithFile(f))
	v, err := m.ReadUint32(4 * mib)
	require.NoError(t, err)
	require.Equal(t, uint32(0x07070707), v, "contents come from the file")
	require.NoError(t, m.WriteUint32(4*mib, 1))
	got := make([]byte, 4)
	_, err = f.ReadAt(got, 4*mib)
	require.NoError(t, err)
	require.Equal(t, []byte{7, 7, 7, 7}, got, "the file is never modified")

	small, err := os.Create(filepath.Join(t.TempDir(), "small"))
	require.NoError(t, err)
	defer small.Close()
	_, err = guestmem.New(twoRegions, guestmem.WithFile(small))
	require.ErrorIs(t, err, guestmem.ErrBacking)
	_, err = guestmem.New(twoRegions, guestmem.WithFile(nil))
	require.ErrorIs(t, err, guestmem.ErrBacking)
}

func TestHugetlbBacking(t *testing.T) {
	testenv.NeedHugetlbPages(t, 4)
	m := newMemory(t, guestmem.Layout{{GPA: 0, Size: 4 * mib}}, guestmem.WithHugetlb(2*mib))
	require.Equal(t, uint64(2*mib), m.PageSize())
	require.NoError(t, m.Prefault(context.Background(), guestmem.PrefaultOptions{}))
	st, err := m.Stats()
	require.NoError(t, err)
	require.Equal(t, uint64(4*mib), st[0].HugePages)
	require.Contains(t, smapsFlags(t, m.Regions()[0].HostAddr), "ht")
	require.ErrorIs(t, m.NoHugepages(), guestmem.ErrBacking)

	_, err = guestmem.New(guestmem.Layout{{GPA: 0, Size: 4096}}, guestmem.WithHugetlb(2*mib))
	require.ErrorIs(t, err, guestmem.ErrUnaligned)
	_, err = guestmem.New(guestmem.Layout{{GPA: 0, Size: 2 * mib}}, guestmem.WithHugetlb(3*mib))
	require.ErrorIs(t, err, guestmem.ErrBacking)
}

func TestHugetlbExhaustionIsAnErrorNotSIGBUS(t *testing.T) {
	testenv.NeedHugetlbPages(t, 1)
	// Far more 2 MiB pages than any test pool holds: the error comes at New
	// (hugetlb reserves at mmap) or at Prefault, never as a SIGBUS.
	m, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: 64 << 30}}, guestmem.WithHugetlb(2*mib))
	if err == nil {
		defer m.Close()
		err = m.Prefault(context.Background(), guestmem.PrefaultOptions{})
	}
	require.Error(t, err)
	require.True(t, errors.Is(err, unix.ENOMEM) || errors.Is(err, arena.ErrFault), "%v", err)
}

func TestPrefault(t *testing.T) {
	for _, b := range []guestmem.Backing{guestmem.Anonymous, guestmem.Memfd} {
		t.Run(b.String(), func(t *testing.T) {
			m := newMemory(t, twoRegions, withBacking(b))
			var calls int
			var last, total uint64
			err := m.Prefault(context.Background(), guestmem.PrefaultOptions{
				Workers: 3, ChunkSize: 1 * mib,
				Progress: func(done, tot uint64) {
					calls++
					require.Greater(t, done, last, "progress only grows")
					last, total = done, tot
				},
			})
			require.NoError(t, err)
			require.Equal(t, m.Size(), total)
			require.Equal(t, m.Size(), last)
			require.Equal(t, 4, calls, "chunks round up to 2 MiB: 8 MiB is 4 chunks")
			st, err := m.Stats()
			require.NoError(t, err)
			for _, r := range st {
				require.Equal(t, r.Size, r.Resident, "region %v", r.GPA)
			}
		})
	}
}

func TestPrefaultSpansAndCancel(t *testing.T) {
	m := newMemory(t, twoRegions)
	require.NoError(t, m.Prefault(context.Background(), guestmem.PrefaultOptions{
		Spans: []guestmem.Span{{GPA: 2 * mib, Size: 4 * mib}}, // crosses the contiguous boundary at 4 MiB
	}))
	st, err := m.Stats()
	require.NoError(t, err)
	require.Equal(t, []uint64{2 * mib, 2 * mib, 0}, []uint64{st[0].Resident, st[1].Resident, st[2].Resident})

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	fresh := newMemory(t, twoRegions)
	err = fresh.Prefault(ctx, guestmem.PrefaultOptions{})
	require.ErrorIs(t, err, context.Canceled)
	st, err = fresh.Stats()
	require.NoError(t, err)
	require.Zero(t, st[0].Resident+st[1].Resident+st[2].Resident, "a cancelled prefault did no work")

	// Absurd tuning is clamped, not a crash.
	require.NoError(t, m.Prefault(context.Background(), guestmem.PrefaultOptions{ChunkSize: math.MaxUint64, Workers: 1 << 30}))
	_, err = guestmem.New(twoRegions, guestmem.WithGuardGap(math.MaxUint64))
	require.ErrorIs(t, err, guestmem.ErrBadOption)

	err = m.Prefault(context.Background(), guestmem.PrefaultOptions{Spans: []guestmem.Span{{GPA: 6 * mib, Size: mib}}})
	require.ErrorIs(t, err, guestmem.ErrHole)
	err = m.Prefault(context.Background(), guestmem.PrefaultOptions{Spans: []guestmem.Span{{GPA: 100, Size: mib}}})
	require.ErrorIs(t, err, guestmem.ErrUnaligned)
}

func TestPolicy(t *testing.T) {
	m := newMemory(t, twoRegions)
	require.NoError(t, m.LockOnFault(guestmem.Span{GPA: 0, Size: 6 * mib}))
	require.NoError(t, m.WriteUint64(0, 1))
	require.NoError(t, m.WriteUint64(5*mib, 1))
	st, err := m.Stats()
	require.NoError(t, err)
	require.Positive(t, st[0].Locked)
	require.Positive(t, st[1].Locked)
	require.Zero(t, st[2].Locked)
	require.NoError(t, m.Unlock())

	require.NoError(t, m.NoHugepages(guestmem.Span{GPA: 16 * mib, Size: 2 * mib}))
	require.Contains(t, smapsFlags(t, m.Regions()[2].HostAddr), "nh")
	require.NoError(t, m.Prefetch())
}

// DropPageCache never loses guest data: on a shared memfd the data stays in
// the fd (only this process's mapping of it is dropped); on private memory,
// where dropping would zero the guest's pages, it is refused, whole guest or
// span alike, and nothing is dropped.
func TestDropPageCacheKeepsGuestData(t *testing.T) {
	shared := newMemory(t, twoRegions, guestmem.WithMemfd())
	require.NoError(t, shared.WriteUint64(0, 0xfeed))
	require.NoError(t, shared.WriteUint64(16*mib, 0xbeef))
	require.NoError(t, shared.LockOnFault(guestmem.Span{GPA: 0, Size: 2 * mib}))
	require.ErrorIs(t, shared.DropPageCache(), arena.ErrLocked)
	require.NoError(t, shared.Unlock())
	before, err := shared.Stats()
	require.NoError(t, err)
	require.Positive(t, before[0].Resident)
	require.NoError(t, shared.DropPageCache())
	after, err := shared.Stats()
	require.NoError(t, err)
	require.Zero(t, after[0].Resident, "the mapping's pages are dropped (smaps Rss)")
	v, err := shared.ReadUint64(0)
	require.NoError(t, err)
	require.Equal(t, uint64(0xfeed), v, "the memfd keeps the data")
	v, err = shared.ReadUint64(16 * mib)
	require.NoError(t, err)
	require.Equal(t, uint64(0xbeef), v)

	private := newMemory(t, twoRegions)
	require.NoError(t, private.WriteUint64(0, 0xfeed))
	require.NoError(t, private.StartDirtyTracking(guestmem.HostWritesOnly()))
	for _, spans := range [][]guestmem.Span{nil, {{GPA: 0, Size: 2 * mib}}} {
		err := private.DropPageCache(spans...)
		require.ErrorIs(t, err, guestmem.ErrDataLoss, "spans %v", spans)
		require.Contains(t, err.Error(), "Discard")
	}
	v, err = private.ReadUint64(0)
	require.NoError(t, err)
	require.Equal(t, uint64(0xfeed), v, "nothing was dropped")
	d, err := private.CollectDirty()
	require.NoError(t, err)
	require.Zero(t, d.Pages(), "nothing changed, so nothing is dirty")

	f := writeFile(t, make([]byte, guestmem.FileSize(twoRegions)))
	file := newMemory(t, twoRegions, guestmem.WithFile(f))
	require.ErrorIs(t, file.DropPageCache(), guestmem.ErrDataLoss)
}

func TestClosed(t *testing.T) {
	m, err := guestmem.New(twoRegions, guestmem.WithMemfd())
	require.NoError(t, err)
	fd := m.FD()
	require.NoError(t, m.Close())
	require.NoError(t, m.Close())
	_, err = unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	require.ErrorIs(t, err, unix.EBADF, "the memfd is closed")
	_, err = m.ReadAt(make([]byte, 1), 0)
	require.ErrorIs(t, err, guestmem.ErrClosed)
	_, err = m.HostAddress(0)
	require.ErrorIs(t, err, guestmem.ErrClosed)
	require.ErrorIs(t, m.Prefault(context.Background(), guestmem.PrefaultOptions{}), guestmem.ErrClosed)
}

// smapsFlags returns the VmFlags of the VMA containing addr.
func smapsFlags(t testing.TB, addr uintptr) []string {
	t.Helper()
	v, ok := testenv.VMAAt(t, addr)
	require.True(t, ok, "no VMA at %#x", addr)
	return v.Flags
}

// mapsPerms returns the permissions of the VMA containing addr, "" if none.
func mapsPerms(t testing.TB, addr uintptr) string {
	t.Helper()
	v, _ := testenv.VMAAt(t, addr)
	return v.Perms
}

// withBacking is the backing option for b, for tests that loop over
// backings (hugetlb and file need arguments, so are not among them).
func withBacking(b guestmem.Backing) guestmem.Option {
	switch b {
	case guestmem.Memfd:
		return guestmem.WithMemfd()
	case guestmem.Anonymous:
		return guestmem.WithAnonymous()
	}
	panic("withBacking: " + b.String())
}

// One option per backing: two are refused, as is WithLayout given to New
// (it applies to the restores) and a nil file.
func TestConflictingOptionsAreRefused(t *testing.T) {
	f := writeFile(t, make([]byte, guestmem.FileSize(twoRegions)))
	for what, opts := range map[string][]guestmem.Option{
		"memfd and hugetlb":  {guestmem.WithMemfd(), guestmem.WithHugetlb(2 * mib)},
		"anonymous and file": {guestmem.WithAnonymous(), guestmem.WithFile(f)},
		"layout to New":      {guestmem.WithLayout(twoRegions)},
	} {
		m, err := guestmem.New(twoRegions, opts...)
		require.Nil(t, m, what)
		require.ErrorIs(t, err, guestmem.ErrBadOption, what)
		oneVoice(t, what, err)
	}
	_, err := guestmem.New(twoRegions, guestmem.WithFile(nil))
	require.ErrorIs(t, err, guestmem.ErrBacking)
	_, err = guestmem.Restore(context.Background(), []io.Reader{bytes.NewReader(nil)}, guestmem.WithMemfd(),
		guestmem.WithAnonymous())
	require.ErrorIs(t, err, guestmem.ErrBadOption)
	m, err := guestmem.New(twoRegions, guestmem.WithMemfd())
	require.NoError(t, err)
	require.Equal(t, guestmem.Memfd, m.Backing())
	require.NoError(t, m.Close())
}

// A hugetlb page size the host does not offer is "not supported".
func TestHugetlbSizeNotOfferedIsUnsupported(t *testing.T) {
	_, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: 1 << 34}}, guestmem.WithHugetlb(1<<34)) // 16 GiB pages: none
	require.ErrorIs(t, err, guestmem.ErrBacking)
	require.ErrorIs(t, err, errors.ErrUnsupported)
}
