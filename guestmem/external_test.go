package guestmem_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
)

// fakeSource reports the pages in dirty (guest addresses), once.
type fakeSource struct {
	dirty []guestmem.GuestAddress
	calls int
	call  func() // run inside TakeDirty
}

func (s *fakeSource) TakeDirty(gpa guestmem.GuestAddress, size uint64, bits []uint64) {
	s.calls++
	if s.call != nil {
		s.call()
	}
	kept := s.dirty[:0]
	for _, a := range s.dirty {
		if a >= gpa && a < gpa+guestmem.GuestAddress(size) {
			p := uint64(a-gpa) / 4096
			bits[p/64] |= 1 << (p % 64)
		} else {
			kept = append(kept, a)
		}
	}
	s.dirty = kept
}

// An attached source's pages join CollectDirty's set with guestmem's own
// writes; what it held when tracking started is not reported; a detached
// source is no longer asked.
func TestDirtySourceIsMerged(t *testing.T) {
	m := newMemory(t, guestmem.Layout{{GPA: 0, Size: 1 << 20}, {GPA: 1 << 30, Size: 1 << 20}})
	src := &fakeSource{dirty: []guestmem.GuestAddress{0x3000}}
	require.NoError(t, m.AttachDirtySource(src))
	require.NoError(t, m.AttachDirtySource(src)) // once
	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	require.Empty(t, src.dirty, "drained as tracking started")

	src.dirty = []guestmem.GuestAddress{0x5000, 1<<30 + 0x41000}
	require.NoError(t, m.WriteUint64(0x6000, 1))
	d, err := m.CollectDirty()
	require.NoError(t, err)
	var got []guestmem.Span
	for s := range d.Ranges() {
		got = append(got, s)
	}
	require.Equal(t, []guestmem.Span{{GPA: 0x5000, Size: 0x2000}, {GPA: 1<<30 + 0x41000, Size: 0x1000}}, got)
	require.Equal(t, uint64(3), d.Pages())
	require.Equal(t, 4, src.calls, "two regions at start, two at the collection")

	src.call = func() {
		_, err := m.CollectDirty()
		require.ErrorIs(t, err, guestmem.ErrReentered)
		_, err = m.AddRegion(guestmem.RegionSpec{GPA: 1 << 32, Size: 1 << 20})
		require.ErrorIs(t, err, guestmem.ErrReentered)
	}
	_, err = m.CollectDirty()
	require.NoError(t, err)
	src.call = nil

	require.NoError(t, m.DetachDirtySource(src))
	src.dirty = []guestmem.GuestAddress{0x7000}
	d, err = m.CollectDirty()
	require.NoError(t, err)
	require.Zero(t, d.Pages())
	require.ErrorIs(t, m.AttachDirtySource(nil), guestmem.ErrBadOption)
}
