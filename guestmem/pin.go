package guestmem

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// ErrPinned is returned by RemoveRegion and Close while a Pin holds memory
// they would unmap: Unpin first.
var ErrPinned = errors.New("memory is pinned")

// pinState counts a region's pins. It is shared by every version of the
// region table (regions are copied by value; this is a pointer).
type pinState struct {
	n     atomic.Int64 // pins held
	going atomic.Bool  // RemoveRegion or Close is taking the region away
}

// Pin is guest memory [GPA, GPA+len(Bytes)) of one region kept mapped for a
// zero-copy user (an I/O buffer handed to the kernel, another library):
// while it is held, the region cannot be removed and the Memory cannot be
// closed (both fail with ErrPinned, rather than waiting on a pin that may
// never end), so Bytes and HostAddr stay valid. Writes through Bytes are not
// seen by dirty tracking: call MarkDirty. Accesses through Bytes are not
// fault-protected (see Slice).
type Pin struct {
	GPA      GuestAddress // the first pinned address
	HostAddr uintptr      // its host virtual address
	b        []byte
	st       *pinState
	once     sync.Once
}

// Bytes returns the pinned memory itself.
func (p *Pin) Bytes() []byte { return p.b }

// Unpin releases the pin; the memory may then be unmapped at any time.
// Unpinning twice does nothing.
func (p *Pin) Unpin() {
	p.once.Do(func() { p.st.n.Add(-1); p.b = nil })
}

// Pin pins guest memory [a, a+n), which must lie in one region (n == 0
// pins nothing and is an empty pin), and returns it for zero-copy use.
func (m *Memory) Pin(a GuestAddress, n uint64) (*Pin, error) {
	t, err := m.acquire("Pin")
	if err != nil {
		return nil, err
	}
	defer t.release()
	i, ok := t.find(a)
	if !ok {
		return nil, &AddressError{Op: "Pin", GPA: a, Len: n, Err: ErrHole}
	}
	r := t.regions[i]
	st := r.pin
	// Dekker with RemoveRegion and Close: each announces itself, then
	// looks at the other; at least one of them sees the other and backs
	// off, so a pin is never granted on memory about to be unmapped.
	st.n.Add(1)
	if st.going.Load() {
		st.n.Add(-1)
		return nil, &AddressError{Op: "Pin", GPA: a, Len: n,
			Err: fmt.Errorf("%w: the region is being removed", ErrNoRegion)}
	}
	b, err := m.Slice(a, n)
	if err != nil {
		st.n.Add(-1)
		if ae, ok := err.(*AddressError); ok {
			ae.Op = "Pin"
		}
		return nil, err
	}
	return &Pin{GPA: a, HostAddr: r.HostAddr + uintptr(a-r.GPA), b: b, st: st}, nil
}

// takeAway marks regions as going and fails with ErrPinned, marking none,
// if any is pinned. The caller holds m.wmu; undo with giveBack.
func takeAway(op string, regions []region) error {
	for i, r := range regions {
		r.pin.going.Store(true)
		if n := r.pin.n.Load(); n > 0 {
			giveBack(regions[:i+1])
			return &AddressError{Op: op, GPA: r.GPA, Len: r.Size,
				Err: fmt.Errorf("%w: %d pins held on the region; Unpin them first", ErrPinned, n)}
		}
	}
	return nil
}

func giveBack(regions []region) {
	for _, r := range regions {
		r.pin.going.Store(false)
	}
}
