package guestmem

import (
	"errors"
	"fmt"
	"iter"
	"math/bits"
	"slices"
	"sync/atomic"

	"github.com/gmem-vmm/gmem/kvm"
)

// ErrNotTracking is returned by CollectDirty and incremental saves while
// dirty tracking is off.
var ErrNotTracking = errors.New("dirty tracking is off")

// dirtyPage is the granularity of dirty tracking: KVM logs 4 KiB pages.
const dirtyPage = 4096

// dirtyBits is a region's host-side dirty bitmap: one bit per 4 KiB page,
// set atomically by guestmem's own write paths.
type dirtyBits struct{ w []atomic.Uint64 }

func newDirtyBits(size uint64) *dirtyBits {
	return &dirtyBits{w: make([]atomic.Uint64, kvm.DirtyBitmapWords(size/dirtyPage))}
}

// mark sets the bits of pages [first, last].
func (d *dirtyBits) mark(first, last uint64) {
	for p := first; p <= last; {
		w, b := p/64, p%64
		n := min(64-b, last-p+1)
		mask := ^uint64(0)
		if n < 64 {
			mask = (uint64(1)<<n - 1) << b
		}
		d.w[w].Or(mask)
		p += n
	}
}

// markDirty records a host write of n bytes at the start of pc.
func (t *table) markDirty(pc piece, n int64) {
	r := t.regions[pc.region]
	if r.dirty == nil || n <= 0 {
		return
	}
	start := uint64(pc.gpa - r.GPA)
	r.dirty.mark(start/dirtyPage, (start+uint64(n)-1)/dirtyPage)
}

// remark puts the pages of d back into the host-side dirty bitmaps of t,
// after a collection whose consumer failed. The caller holds t and m.wmu.
func (t *table) remark(d *DirtySet) {
	for s := range d.Ranges() {
		if ps, err := t.resolve("Save", s.GPA, s.Size); err == nil {
			for _, pc := range ps {
				t.markDirty(pc, pc.n)
			}
		}
	}
}

// MarkDirty records that [a, a+n) was written behind guestmem's back (through
// Slice or HostAddress). Outside dirty tracking it checks the range only.
func (m *Memory) MarkDirty(a GuestAddress, n uint64) error {
	t, err := m.acquire("MarkDirty")
	if err != nil {
		return err
	}
	defer t.release()
	pieces, err := t.resolve("MarkDirty", a, n)
	if err != nil {
		return err
	}
	for _, pc := range pieces {
		t.markDirty(pc, pc.n)
	}
	return nil
}

// TrackingOption tunes StartDirtyTracking.
type TrackingOption func(*trackingConfig)

type trackingConfig struct{ hostOnly bool }

// HostWritesOnly declares that no vCPU writes the memory while it is not
// registered (a device model, a test, a VMM that has not started its guest),
// so the dirty set of guestmem's own writes is the whole truth. Without it,
// CollectDirty and incremental Saves on memory that was never registered
// while tracking are ErrNotRegistered: guestmem would not see what a guest
// wrote through slots a VMM set up itself from Region.HostAddr.
func HostWritesOnly() TrackingOption { return func(c *trackingConfig) { c.hostOnly = true } }

// StartDirtyTracking turns dirty tracking on: KVM logs the pages vCPUs write
// (every writable region's slot gets KVM_MEM_LOG_DIRTY_PAGES, now and when
// registered later), and guestmem records the pages its own write methods
// touch, as a device writing into guest RAM dirties it too. Pages written
// before this call are not reported. Calling it while tracking is a no-op.
// Guest writes are seen only through slots Register made: collecting from
// memory that was not registered at some point while tracking is an error,
// unless the caller declares HostWritesOnly.
func (m *Memory) StartDirtyTracking(opts ...TrackingOption) error {
	var c trackingConfig
	for _, o := range opts {
		o(&c)
	}
	return m.setTracking(true, c.hostOnly)
}

// StopDirtyTracking turns dirty tracking off and forgets what was dirty.
func (m *Memory) StopDirtyTracking() error { return m.setTracking(false, false) }

// Tracking reports whether dirty tracking is on.
func (m *Memory) Tracking() (on bool) {
	m.peek(func() { on = m.tracking })
	return on
}

func (m *Memory) setTracking(on, hostOnly bool) error {
	op := "StopDirtyTracking"
	if on {
		op = "StartDirtyTracking"
	}
	if err := m.lock(op, true); err != nil {
		return err
	}
	defer m.wmu.Unlock()
	t := m.tab.Load()
	if t.closed {
		return closedErr(op)
	}
	if m.tracking == on {
		return nil
	}
	if on && m.gmem != nil && m.reg != nil {
		return fmt.Errorf("guestmem: %s: %w: KVM keeps no dirty log of guest_memfd slots "+
			"(KVM_MEM_LOG_DIRTY_PAGES is refused), so guest writes cannot be tracked while the memory is "+
			"registered; Unregister first (then only host writes are tracked: HostWritesOnly)", op, ErrGuestMemfdLimit)
	}
	m.tracking = on
	m.hostOnly, m.trackSeen = hostOnly, m.reg != nil
	m.snap.tracked = false // an increment needs tracking on since the last Save
	regions := slices.Clone(t.regions)
	for i := range regions {
		regions[i].dirty = nil
		if on {
			regions[i].dirty = newDirtyBits(regions[i].Size)
		}
		if id, ok := m.reg.slot(regions[i].GPA); ok && !regions[i].ReadOnly {
			if err := m.reg.vm.SetSlot(m.slotFor(regions[i], id)); err != nil {
				m.tracking = !on
				for _, r := range regions[:i] { // put the earlier slots back
					if id, ok := m.reg.slot(r.GPA); ok && !r.ReadOnly {
						err = errors.Join(err, m.reg.vm.SetSlot(m.slotFor(r, id)))
					}
				}
				return fmt.Errorf("guestmem: %s: region at %v: %w", op, regions[i].GPA, err)
			}
		}
	}
	if on {
		m.drainExternal(regions)
	}
	m.publish(&table{regions: regions})
	return nil
}

// DirtySet is the set of guest pages dirtied between two collections, at
// 4 KiB granularity.
type DirtySet struct {
	spans []Span // sorted, coalesced
	pages uint64
}

// Pages returns the number of dirty 4 KiB pages.
func (d *DirtySet) Pages() uint64 { return d.pages }

// Bytes returns the dirty bytes.
func (d *DirtySet) Bytes() uint64 { return d.pages * dirtyPage }

// Ranges iterates over the dirty guest-physical ranges, lowest first, each
// a maximal run of dirty pages within one region.
func (d *DirtySet) Ranges() iter.Seq[Span] {
	return func(yield func(Span) bool) {
		for _, s := range d.spans {
			if !yield(s) {
				return
			}
		}
	}
}

// Contains reports whether the page holding a is dirty.
func (d *DirtySet) Contains(a GuestAddress) bool {
	_, ok := slices.BinarySearchFunc(d.spans, a, func(s Span, a GuestAddress) int {
		switch {
		case s.GPA+GuestAddress(s.Size) <= a:
			return -1
		case s.GPA > a:
			return 1
		}
		return 0
	})
	return ok
}

// CollectDirty returns the pages dirtied since tracking started or since the
// last collection — the union of KVM's dirty log of every registered region
// and the writes made through guestmem's own methods — and resets both.
func (m *Memory) CollectDirty() (*DirtySet, error) {
	if err := m.lock("CollectDirty", false); err != nil {
		return nil, err
	}
	defer m.wmu.Unlock()
	return m.collectLocked("CollectDirty", true)
}

// collectLocked collects and resets the dirty set. strict refuses memory
// whose guest writes tracking may have missed (see HostWritesOnly); a full
// Save, which only resets, passes false.
func (m *Memory) collectLocked(op string, strict bool) (*DirtySet, error) {
	t, err := m.acquire(op)
	if err != nil {
		return nil, err
	}
	defer t.release()
	if !m.tracking {
		return nil, fmt.Errorf("guestmem: %s: %w", op, ErrNotTracking)
	}
	if strict && !m.trackSeen && !m.hostOnly {
		return nil, fmt.Errorf("guestmem: %s: %w since tracking started, so a guest's writes through slots "+
			"guestmem does not control would go unseen: Register the memory (kvm.Adopt a VM made elsewhere), or "+
			"start tracking with HostWritesOnly() if no vCPU writes it", op, ErrNotRegistered)
	}
	d := &DirtySet{}
	var kvmBits []uint64
	for _, r := range t.regions {
		words := len(r.dirty.w)
		if id, ok := m.reg.slot(r.GPA); ok && !r.ReadOnly {
			if cap(kvmBits) < words {
				kvmBits = make([]uint64, words)
			}
			kvmBits = kvmBits[:words]
			if err := m.reg.vm.GetDirtyLog(id, kvmBits); err != nil {
				return nil, fmt.Errorf("guestmem: %s: region at %v: %w", op, r.GPA, err)
			}
		} else {
			kvmBits = kvmBits[:0]
		}
		kvmBits = m.takeExternal(op, r, kvmBits) // a vhost-user back end's log (external.go)
		pages := r.Size / dirtyPage
		runStart := int64(-1)
		flush := func(end uint64) {
			if runStart >= 0 {
				d.spans = append(d.spans, Span{GPA: r.GPA + GuestAddress(uint64(runStart)*dirtyPage),
					Size: (end - uint64(runStart)) * dirtyPage})
				runStart = -1
			}
		}
		for w := 0; w < words; w++ {
			v := r.dirty.w[w].Swap(0)
			if len(kvmBits) > 0 {
				v |= kvmBits[w]
			}
			if w == words-1 && pages%64 != 0 {
				v &= uint64(1)<<(pages%64) - 1
			}
			if v == 0 {
				flush(uint64(w) * 64)
				continue
			}
			if v == ^uint64(0) {
				if runStart < 0 {
					runStart = int64(w) * 64
				}
				d.pages += 64
				continue
			}
			d.pages += uint64(bits.OnesCount64(v))
			// Walk the word run by run: the next set bit when outside a run,
			// the next clear bit inside one (shifting in zeros above bit 63
			// reads as "still set", so a run at the top continues into the
			// next word).
			base := uint64(w) * 64
			for b := 0; b < 64; {
				if runStart < 0 {
					b += bits.TrailingZeros64(v >> b)
					if b < 64 {
						runStart = int64(base) + int64(b)
					}
				} else {
					b += bits.TrailingZeros64(^v >> b)
					if b < 64 {
						flush(base + uint64(b))
					}
				}
			}
		}
		flush(pages)
	}
	return d, nil
}
