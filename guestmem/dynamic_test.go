package guestmem_test

import (
	"bytes"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

func spans(d *guestmem.DirtySet) []guestmem.Span { return slices.Collect(d.Ranges()) }

func TestDirtyTrackingHostWrites(t *testing.T) {
	m := newMemory(t, snapLayout)
	_, err := m.CollectDirty()
	require.ErrorIs(t, err, guestmem.ErrNotTracking)
	require.NoError(t, m.WriteUint64(0, 1)) // before tracking: not reported
	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	require.True(t, m.Tracking())

	require.NoError(t, m.WriteUint64(4096*5+8, 1))        // page 5
	_, err = m.WriteAt(make([]byte, 4096+2), 4096*9+4095) // pages 9..11
	require.NoError(t, err)
	require.NoError(t, m.StoreUint32(16*mib, 7))              // region 2, page 0
	_, err = m.CompareAndSwapUint64(16*mib+4096*1024+8, 0, 1) // region 2, page 1024
	require.NoError(t, err)
	require.NoError(t, m.MarkDirty(32*mib+4096, 4096*2)) // read-only region: host writes count
	_, err = m.ReadUint64(4096 * 100)                    // reads do not dirty
	require.NoError(t, err)
	d, err := m.CollectDirty()
	require.NoError(t, err)
	require.Equal(t, []guestmem.Span{
		{GPA: 4096 * 5, Size: 4096},
		{GPA: 4096 * 9, Size: 3 * 4096},
		{GPA: 16 * mib, Size: 4096},
		{GPA: 16*mib + 4096*1024, Size: 4096},
		{GPA: 32*mib + 4096, Size: 2 * 4096},
	}, spans(d))
	require.Equal(t, uint64(8), d.Pages())
	require.True(t, d.Contains(4096*10+5))
	require.False(t, d.Contains(4096*8))

	d, err = m.CollectDirty()
	require.NoError(t, err)
	require.Zero(t, d.Pages(), "collecting resets")

	// A whole region, and the page at its end, to exercise full words and the tail.
	_, err = m.WriteAt(make([]byte, 8*mib), 0)
	require.NoError(t, err)
	d, err = m.CollectDirty()
	require.NoError(t, err)
	require.Equal(t, []guestmem.Span{{GPA: 0, Size: 8 * mib}}, spans(d))

	require.NoError(t, m.StopDirtyTracking())
	_, err = m.CollectDirty()
	require.ErrorIs(t, err, guestmem.ErrNotTracking)
}

func TestDiscard(t *testing.T) {
	for _, backing := range []guestmem.Backing{guestmem.Anonymous, guestmem.Memfd} {
		t.Run(backing.String(), func(t *testing.T) {
			m := newMemory(t, snapLayout, withBacking(backing))
			_, err := m.WriteAt(bytes.Repeat([]byte{0xee}, 8*mib), 0)
			require.NoError(t, err)
			rss := func() uint64 {
				st, err := m.Stats()
				require.NoError(t, err)
				return st[0].Resident
			}
			blocks := func() int64 {
				var st unix.Stat_t
				require.NoError(t, unix.Fstat(m.FD(), &st))
				return st.Blocks * 512
			}
			require.Equal(t, uint64(8*mib), rss())
			var before int64
			if backing == guestmem.Memfd {
				before = blocks()
			}
			require.NoError(t, m.Discard(2*mib, 4*mib))
			require.Equal(t, uint64(4*mib), rss(), "Rss drops by what was discarded")
			if backing == guestmem.Memfd {
				require.Equal(t, before-4*mib, blocks(), "the memfd's blocks are freed")
			}
			b := make([]byte, 8*mib)
			_, err = m.ReadAt(b, 0)
			require.NoError(t, err)
			require.Equal(t, bytes.Repeat([]byte{0xee}, 2*mib), b[:2*mib])
			require.Equal(t, make([]byte, 4*mib), b[2*mib:6*mib])
			require.Equal(t, bytes.Repeat([]byte{0xee}, 2*mib), b[6*mib:])

			var ae *guestmem.AddressError
			require.ErrorIs(t, m.Discard(32*mib, 4096), guestmem.ErrReadOnly)
			require.ErrorIs(t, m.Discard(8*mib, 4096), guestmem.ErrHole)
			require.ErrorAs(t, m.Discard(8*mib, 4096), &ae)
			require.Equal(t, guestmem.GuestAddress(8*mib), ae.GPA)
			require.ErrorIs(t, m.Discard(100, 4096), guestmem.ErrUnaligned)
			require.ErrorIs(t, m.Discard(0, 0), guestmem.ErrZeroSize)
			require.ErrorIs(t, m.Discard(^guestmem.GuestAddress(0)-4095, 8192), guestmem.ErrAddressOverflow)

			require.NoError(t, m.LockOnFault(guestmem.Span{GPA: 0, Size: 2 * mib}))
			_, err = m.WriteAt([]byte{1}, 0)
			require.NoError(t, err)
			err = m.Discard(0, 4096)
			require.ErrorIs(t, err, arena.ErrLocked)
			require.Contains(t, err.Error(), "Unlock")
			require.NoError(t, m.Unlock(guestmem.Span{GPA: 0, Size: 2 * mib}))
			require.NoError(t, m.Discard(0, 4096))
		})
	}
}

func TestHotplugHostSide(t *testing.T) {
	m := newMemory(t, guestmem.Layout{{GPA: 0, Size: 4 * mib}}, guestmem.WithMemfd(),
		guestmem.WithHotplug(6*mib))
	r, err := m.AddRegion(guestmem.RegionSpec{GPA: 1 << 32, Size: 4 * mib})
	require.NoError(t, err)
	require.Equal(t, guestmem.GuestAddress(1<<32), r.GPA)
	require.Equal(t, -1, r.Slot, "not registered")
	require.Len(t, m.Regions(), 2)
	require.NoError(t, m.WriteUint64(1<<32+8, 42))
	v, err := m.ReadUint64(1<<32 + 8)
	require.NoError(t, err)
	require.Equal(t, uint64(42), v)
	// Through the memfd too: the region is at its FDOffset.
	var buf [8]byte
	_, err = unix.Pread(m.FD(), buf[:], r.FDOffset+8)
	require.NoError(t, err)
	require.Equal(t, byte(42), buf[0])
	// The new region has its own guard gaps.
	vma, ok := testenv.VMAAt(t, r.HostAddr-4096)
	require.True(t, !ok || vma.Perms == "---p", "guard page below a hot-added region")

	_, err = m.AddRegion(guestmem.RegionSpec{GPA: 2 * mib, Size: 4 * mib})
	require.ErrorIs(t, err, guestmem.ErrOverlap)
	var le *guestmem.LayoutError
	require.ErrorAs(t, err, &le)
	require.Equal(t, guestmem.GuestAddress(2*mib), le.Region.GPA, "the error names the new region")
	_, err = m.AddRegion(guestmem.RegionSpec{GPA: 1 << 33, Size: 4 * mib})
	require.ErrorIs(t, err, guestmem.ErrHotplugSpace, "6 MiB reserved, 4 used")
	_, err = m.AddRegion(guestmem.RegionSpec{GPA: 1 << 33, Size: 4097})
	require.ErrorIs(t, err, guestmem.ErrUnaligned)
	require.Len(t, m.Regions(), 2, "failed adds change nothing")

	var st unix.Stat_t
	require.NoError(t, unix.Fstat(m.FD(), &st))
	before := st.Blocks
	require.ErrorIs(t, m.RemoveRegion(1<<32+4096), guestmem.ErrNoRegion)
	require.NoError(t, m.RemoveRegion(1<<32))
	require.NoError(t, unix.Fstat(m.FD(), &st))
	require.Less(t, st.Blocks, before, "the removed region's memfd pages are freed")
	_, err = m.ReadUint64(1<<32 + 8)
	require.ErrorIs(t, err, guestmem.ErrHole)
	// Its space is reusable, and reads zeros.
	r, err = m.AddRegion(guestmem.RegionSpec{GPA: 1 << 33, Size: 6 * mib})
	require.NoError(t, err)
	v, err = m.ReadUint64(1<<33 + 8)
	require.NoError(t, err)
	require.Zero(t, v)
	// A region from New can be removed too.
	require.NoError(t, m.RemoveRegion(0))
	require.Len(t, m.Regions(), 1)
}

// Readers of one region run while another is added and removed over and
// over: they never see an error or a torn table (run under -race).
func TestHotplugConcurrentReaders(t *testing.T) {
	m := newMemory(t, guestmem.Layout{{GPA: 0, Size: 2 * mib}}, guestmem.WithMemfd(),
		guestmem.WithHotplug(2*mib))
	require.NoError(t, m.WriteUint64(64, 0x1234))
	var stop atomic.Bool
	var wg sync.WaitGroup
	var reads, holes atomic.Int64
	for w := 0; w < 3; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				v, err := m.ReadUint64(64)
				if err != nil || v != 0x1234 {
					t.Errorf("stable region: %#x, %v", v, err)
					return
				}
				_, err = m.ReadUint64(1<<30 + 64)
				switch {
				case err == nil:
					reads.Add(1)
				case errors.Is(err, guestmem.ErrHole):
					holes.Add(1)
				default:
					t.Errorf("hotplugged region: %v", err)
					return
				}
				_ = m.Regions()
			}
		}()
	}
	for i := 0; i < 200; i++ {
		_, err := m.AddRegion(guestmem.RegionSpec{GPA: 1 << 30, Size: 2 * mib})
		require.NoError(t, err)
		require.NoError(t, m.RemoveRegion(1<<30))
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("reads of the hot region: %d served, %d holes", reads.Load(), holes.Load())
}
