package arena_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

// Each operation is checked by what the kernel shows afterwards (mincore,
// smaps, fstat of the backing), not by its nil error.

func TestPrefetchReadsFileAheadWithoutTouching(t *testing.T) {
	const size = 4 << 20
	path := filepath.Join(t.TempDir(), "backing") // on disk: its page cache can be dropped
	require.NoError(t, os.WriteFile(path, bytes.Repeat([]byte{0xAB}, size), 0o600))
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	fd := int(f.Fd())
	require.NoError(t, unix.Fsync(fd))
	require.NoError(t, unix.Fadvise(fd, 0, size, unix.FADV_DONTNEED))

	m, err := arena.NewFromFD(fd, 0, size, arena.WithProtection(arena.ProtRead))
	require.NoError(t, err)
	defer m.Close()
	before := residentPages(t, m, 0, size)
	require.Less(t, before, int(size/page), "page cache was not dropped; the test cannot observe readahead")

	require.NoError(t, m.Prefetch(0, size))
	// Readahead is asynchronous: wait for the kernel, bounded, without touching the memory.
	deadline := time.Now().Add(10 * time.Second)
	for residentPages(t, m, 0, size) < int(size/page) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	require.Equal(t, int(size/page), residentPages(t, m, 0, size))
	// Resident in the page cache, but not faulted into this process.
	require.Zero(t, stats(t, m, 0, size).Rss)
}

func TestDropPageCacheOnPrivateAnonGivesZerosAndLowersRss(t *testing.T) {
	const size = 8 << 20
	m, err := arena.NewAnon(size, arena.Private())
	require.NoError(t, err)
	defer m.Close()
	_, err = m.WriteAt(bytes.Repeat([]byte{7}, size), 0)
	require.NoError(t, err)
	require.Equal(t, int64(size), stats(t, m, 0, size).Rss)

	require.NoError(t, m.DropPageCache(0, size/2))
	require.Equal(t, int64(size/2), stats(t, m, 0, size).Rss)
	got := make([]byte, size)
	_, err = m.ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, make([]byte, size/2), got[:size/2])
	require.Equal(t, bytes.Repeat([]byte{7}, size/2), got[size/2:])
}

func TestDropPageCacheOnLockedRangeSaysLocked(t *testing.T) {
	m, err := arena.NewAnon(16*page, arena.Private())
	require.NoError(t, err)
	defer m.Close()
	require.NoError(t, m.LockOnFault(0, 16*page))
	err = m.DropPageCache(0, 16*page)
	require.ErrorIs(t, err, arena.ErrLocked)
	require.ErrorIs(t, err, unix.EINVAL, "the kernel's errno travels with the error")
	require.NoError(t, m.Unlock(0, 16*page))
	require.NoError(t, m.DropPageCache(0, 16*page))
}

func TestRemoveRangeFreesMemfdBlocks(t *testing.T) {
	const size = 8 << 20
	fd := newMemfd(t, size)
	m, err := arena.NewFromFD(fd, 0, size)
	require.NoError(t, err)
	defer m.Close()
	_, err = m.WriteAt(bytes.Repeat([]byte{9}, size), 0)
	require.NoError(t, err)
	require.Equal(t, int64(size), allocatedBytes(t, fd))

	require.NoError(t, m.RemoveRange(2<<20, 4<<20))
	require.Equal(t, int64(size-4<<20), allocatedBytes(t, fd))
	got := make([]byte, size)
	_, err = m.ReadAt(got, 0)
	require.NoError(t, err)
	require.Equal(t, bytes.Repeat([]byte{9}, 2<<20), got[:2<<20])
	require.Equal(t, make([]byte, 4<<20), got[2<<20:6<<20])
	require.Equal(t, bytes.Repeat([]byte{9}, 2<<20), got[6<<20:])
	// The fd agrees: the hole is in the backing, not just this mapping.
	buf := make([]byte, page)
	_, err = unix.Pread(fd, buf, 3<<20)
	require.NoError(t, err)
	require.Equal(t, make([]byte, page), buf)
}

func TestRemoveRangeNeedsSharedMapping(t *testing.T) {
	m, err := arena.NewAnon(4*page, arena.Private())
	require.NoError(t, err)
	defer m.Close()
	require.ErrorIs(t, m.RemoveRange(0, 4*page), arena.ErrNotShared)
}

func TestLockOnFaultLocksOnlyTouchedPages(t *testing.T) {
	const size = 64 * 4096
	m, err := arena.NewAnon(size, arena.Private())
	require.NoError(t, err)
	defer m.Close()
	require.NoError(t, m.LockOnFault(0, size))
	st := stats(t, m, 0, size)
	require.True(t, st.HasFlag("lf"), "VmFlags %v", st.VMAs[0].Flags)
	require.True(t, st.HasFlag("lo"))
	require.Zero(t, st.Locked, "nothing touched yet, nothing locked")

	for i := int64(0); i < 10; i++ {
		require.NoError(t, m.WriteUint8(i*page, 1))
	}
	require.Equal(t, 10*page, stats(t, m, 0, size).Locked)

	require.NoError(t, m.Unlock(0, size))
	st = stats(t, m, 0, size)
	require.Zero(t, st.Locked)
	require.False(t, st.AnyFlag("lf"))
}

func TestMadviseFlagsShowInSmaps(t *testing.T) {
	const size = 4 << 20
	m, err := arena.NewAnon(size, arena.Private(), arena.Align(2<<20))
	require.NoError(t, err)
	defer m.Close()
	require.True(t, stats(t, m, 0, size).HasFlag("dd"), "every mapping is MADV_DONTDUMP by default")

	require.NoError(t, m.UseHugepages(0, size))
	require.True(t, stats(t, m, 0, size).HasFlag("hg"))
	require.NoError(t, m.NoHugepages(0, size))
	st := stats(t, m, 0, size)
	require.True(t, st.HasFlag("nh"))
	require.False(t, st.AnyFlag("hg"))

	require.NoError(t, m.UseDontfork(0, size))
	require.True(t, stats(t, m, 0, size).HasFlag("dc"))

	kept, err := arena.NewAnon(page, arena.KeepInCoreDumps())
	require.NoError(t, err)
	defer kept.Close()
	require.False(t, stats(t, kept, 0, page).AnyFlag("dd"))
}

func TestPopulateMakesRangeResident(t *testing.T) {
	const size = 16 << 20
	for _, tc := range []struct {
		name string
		make func() (*arena.Mapping, error)
		mode arena.PopulateMode
	}{
		{"private anon write", func() (*arena.Mapping, error) { return arena.NewAnon(size, arena.Private()) }, arena.PopulateWrite},
		{"shared anon write", func() (*arena.Mapping, error) { return arena.NewAnon(size) }, arena.PopulateWrite},
		{"memfd write", func() (*arena.Mapping, error) { return arena.NewFromFD(newMemfd(t, size), 0, size) }, arena.PopulateWrite},
		{"private anon read", func() (*arena.Mapping, error) { return arena.NewAnon(size, arena.Private()) }, arena.PopulateRead},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := tc.make()
			require.NoError(t, err)
			defer m.Close()
			require.Zero(t, residentPages(t, m, 0, size))
			require.NoError(t, m.Populate(page, size-2*page, tc.mode))
			require.Equal(t, int(size/page)-2, residentPages(t, m, 0, size))
			if tc.mode == arena.PopulateWrite {
				// Read-populated private anonymous memory maps the shared
				// zero page, which mincore counts but Rss does not.
				require.Equal(t, size-2*page, stats(t, m, 0, size).Rss)
			}
		})
	}
}

func TestPopulateOptionPrefaultsAtMapTime(t *testing.T) {
	const size = 4 << 20
	m, err := arena.NewAnon(size, arena.Private(), arena.PopulateOnMap())
	require.NoError(t, err)
	defer m.Close()
	require.Equal(t, int(size/page), residentPages(t, m, 0, size))
}

func TestMsyncWritesThroughToFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	require.NoError(t, os.WriteFile(path, make([]byte, 4*page), 0o600))
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	defer f.Close()
	m, err := arena.NewFromFD(int(f.Fd()), 0, 4*page)
	require.NoError(t, err)
	defer m.Close()
	_, err = m.WriteAt([]byte("synced"), page)
	require.NoError(t, err)
	require.NoError(t, m.Msync(0, 4*page))
	st := stats(t, m, 0, 4*page)
	require.True(t, st.HasFlag("sh"))
	got := make([]byte, 6)
	_, err = f.ReadAt(got, page)
	require.NoError(t, err)
	require.Equal(t, "synced", string(got))
}

func TestHugetlbMapping(t *testing.T) {
	testenv.NeedHugetlbPages(t, 4)
	const huge = 2 << 20
	m, err := arena.NewAnon(2*huge, arena.Private(), arena.Hugetlb(huge))
	require.NoError(t, err)
	defer m.Close()
	require.Zero(t, m.Addr()%huge)
	require.NoError(t, m.Populate(0, 2*huge, arena.PopulateWrite))
	st := stats(t, m, 0, 2*huge)
	require.True(t, st.HasFlag("ht"), "VmFlags %v", st.VMAs[0].Flags)
	require.Equal(t, int64(2*huge), st.Hugetlb, "hugetlb memory is counted apart from Rss")
	require.ErrorIs(t, m.Prefetch(0, page), arena.ErrUnaligned, "ranges over hugetlb memory are hugepage-granular")

	_, err = arena.NewAnon(huge+page, arena.Hugetlb(huge))
	require.ErrorIs(t, err, arena.ErrUnaligned)
	_, err = arena.NewAnon(huge, arena.Hugetlb(3<<20))
	require.ErrorIs(t, err, arena.ErrBadOption)
}

func TestHugetlbPoolExhaustionIsAnError(t *testing.T) {
	testenv.NeedHugetlbPages(t, 1)
	const huge = 2 << 20
	// Reserve nothing up front, then ask for far more pages than any test
	// pool has: populating must fail with an error, not kill the process.
	m, err := arena.NewAnon(4096*huge, arena.Private(), arena.Hugetlb(huge), arena.NoReserve())
	require.NoError(t, err)
	defer m.Close()
	err = m.Populate(0, 4096*huge, arena.PopulateWrite)
	require.Error(t, err)
	var se *os.SyscallError
	require.True(t, errors.As(err, &se) || errors.Is(err, arena.ErrFault), "got %v", err)
}

func TestAlignedMappingLeavesNoSlack(t *testing.T) {
	const align = 1 << 30
	m, err := arena.NewAnon(2<<20, arena.Private(), arena.Align(align))
	require.NoError(t, err)
	defer m.Close()
	require.Zero(t, m.Addr()%align)
	// The over-sized reservation's slack was returned: nothing of ours is
	// mapped just below or just above.
	require.Empty(t, mapsPerms(t, m.Addr()-1), "slack below")
	require.Empty(t, mapsPerms(t, m.Addr()+uintptr(m.Size())), "slack above")

	_, err = arena.NewAnon(page, arena.Align(3*page))
	require.ErrorIs(t, err, arena.ErrBadAlignment)
	_, err = arena.NewAnon(page, arena.Align(page/2))
	require.ErrorIs(t, err, arena.ErrBadAlignment)
}

func TestCloseIsIdempotentAndLaterCallsSayClosed(t *testing.T) {
	m, err := arena.NewAnon(4 * page)
	require.NoError(t, err)
	addr := m.Addr()
	require.NoError(t, m.Close())
	require.NoError(t, m.Close())
	require.Empty(t, mapsPerms(t, addr), "the memory is unmapped")
	_, err = m.ReadAt(make([]byte, 1), 0)
	require.ErrorIs(t, err, arena.ErrClosed)
	require.ErrorIs(t, m.Prefetch(0, page), arena.ErrClosed)
	_, err = m.LoadUint32(0)
	require.ErrorIs(t, err, arena.ErrClosed)
}

// TestFailedAlignedMappingReleasesItsReservation makes the inner MAP_FIXED of
// an aligned mapping fail (a hugetlb mapping bigger than the pool, with swap
// reservation on, fails with ENOMEM) and checks that the over-sized
// PROT_NONE reservation made for alignment is gone: crosvm leaks it.
func TestFailedAlignedMappingReleasesItsReservation(t *testing.T) {
	testenv.NeedHugetlbPages(t, 1)
	const huge = 2 << 20
	const size = 64 << 30 // far more than any test pool
	// A failed MAP_FIXED may have unmapped part of the reservation first, so
	// a leak shows as new PROT_NONE pieces of any size: compare the sets.
	reservations := func() map[pmVMA]bool {
		set := map[pmVMA]bool{}
		for _, v := range pmParse(t) {
			if v.perms == "---p" {
				set[v] = true
			}
		}
		return set
	}
	before := reservations()
	_, err := arena.NewAnon(size, arena.Private(), arena.Hugetlb(huge), arena.Align(1<<30))
	require.ErrorIs(t, err, unix.ENOMEM)
	require.Contains(t, err.Error(), "mmap")
	for v := range reservations() {
		require.True(t, before[v], "the alignment reservation leaked: %#x-%#x", v.start, v.end)
	}
}

// TestLockOnFaultNamesTheMemlockLimit runs LockOnFault past RLIMIT_MEMLOCK on
// a thread without CAP_IPC_LOCK: the error keeps the errno and says the
// limit and the request.
func TestLockOnFaultNamesTheMemlockLimit(t *testing.T) {
	var old unix.Rlimit
	require.NoError(t, unix.Getrlimit(unix.RLIMIT_MEMLOCK, &old))
	const limit = 64 << 10
	lowered := old
	lowered.Cur = limit
	require.NoError(t, unix.Setrlimit(unix.RLIMIT_MEMLOCK, &lowered))
	defer func() { require.NoError(t, unix.Setrlimit(unix.RLIMIT_MEMLOCK, &old)) }()

	m, err := arena.NewAnon(1<<20, arena.Private())
	require.NoError(t, err)
	defer m.Close()
	done := make(chan error)
	go func() {
		// Capabilities are per thread: drop CAP_IPC_LOCK on a thread of our
		// own, which is discarded when this goroutine exits still locked.
		runtime.LockOSThread()
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			done <- err
			return
		}
		data[0].Effective &^= 1 << unix.CAP_IPC_LOCK
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			done <- err
			return
		}
		done <- m.LockOnFault(0, 1<<20)
	}()
	err = <-done
	require.Error(t, err)
	require.True(t, errors.Is(err, unix.ENOMEM) || errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EPERM), "%v", err)
	require.Contains(t, err.Error(), "RLIMIT_MEMLOCK is 65536 bytes")
	require.Contains(t, err.Error(), "asked to lock 1048576 bytes")
	st := stats(t, m, 0, 1<<20)
	require.False(t, st.AnyFlag("lf"), "nothing was locked")
}
