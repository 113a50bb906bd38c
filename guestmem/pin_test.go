package guestmem_test

import (
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
)

// A pinned range stays mapped: RemoveRegion and Close fail with ErrPinned
// (and change nothing) until Unpin.
func TestPinKeepsMemoryMapped(t *testing.T) {
	m := newMemory(t, twoRegions, guestmem.WithMemfd())
	require.NoError(t, m.WriteUint64(16*mib+8, 0x99))
	p, err := m.Pin(16*mib, 4096)
	require.NoError(t, err)
	require.Len(t, p.Bytes(), 4096)
	require.Equal(t, byte(0x99), p.Bytes()[8])
	h, err := m.HostAddress(16 * mib)
	require.NoError(t, err)
	require.Equal(t, h, p.HostAddr)

	err = m.RemoveRegion(16 * mib)
	require.ErrorIs(t, err, guestmem.ErrPinned)
	oneVoice(t, "remove pinned", err)
	require.ErrorIs(t, m.Close(), guestmem.ErrPinned)
	require.Len(t, m.Regions(), 3, "nothing was removed")
	p.Bytes()[9] = 0x77 // still mapped
	v, err := m.ReadUint8(16*mib + 9)
	require.NoError(t, err)
	require.Equal(t, uint8(0x77), v)

	p.Unpin()
	p.Unpin() // twice is nothing
	require.Nil(t, p.Bytes())
	require.NoError(t, m.RemoveRegion(16*mib))
	_, err = m.Pin(16*mib, 4096)
	require.ErrorIs(t, err, guestmem.ErrHole)
	_, err = m.Pin(4*mib-8, 16)
	require.ErrorIs(t, err, guestmem.ErrSpansRegions)
	empty, err := m.Pin(0, 0)
	require.NoError(t, err)
	require.Empty(t, empty.Bytes())
	empty.Unpin()
}

// Pins racing RemoveRegion and AddRegion of the same region: a pin that is
// granted always reads mapped memory (an unmapped one would crash the
// test), and a RemoveRegion that succeeds had no pin.
func TestPinRacesRemoveRegion(t *testing.T) {
	m := newMemory(t, guestmem.Layout{{GPA: 0, Size: 2 * mib}}, guestmem.WithMemfd(), guestmem.WithHotplug(4*mib))
	const hot = 64 * mib
	_, err := m.AddRegion(guestmem.RegionSpec{GPA: hot, Size: 2 * mib})
	require.NoError(t, err)
	var stop atomic.Bool
	var granted, refused atomic.Int64
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				p, err := m.Pin(hot, 4096)
				if err != nil {
					refused.Add(1)
					continue
				}
				granted.Add(1)
				b := p.Bytes()
				for i := 0; i < len(b); i += 512 {
					_ = b[i] // faults if unmapped
				}
				p.Unpin()
			}
		}()
	}
	removed := 0
	for i := 0; i < 300; i++ {
		if err := m.RemoveRegion(hot); err == nil {
			removed++
			_, err := m.AddRegion(guestmem.RegionSpec{GPA: hot, Size: 2 * mib})
			require.NoError(t, err)
		} else {
			require.ErrorIs(t, err, guestmem.ErrPinned)
		}
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d removals, %d pins granted, %d refused", removed, granted.Load(), refused.Load())
	require.Positive(t, removed)
	require.Positive(t, granted.Load())
}
