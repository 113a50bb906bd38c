//go:build linux

package uffd

import (
	"sync"
	"sync/atomic"
)

// order keeps faults behind the Remove and Unmap events read before them.
//
// The madvise or munmap behind such an event returns as soon as the event is
// read, before any handler has seen it, and the memory it dropped can fault
// again at once. If another Serve loop handed that fault to its handler
// before the Remove reached a handler, the page would be served from the
// snapshot instead of as zeros. So every Remove and Unmap a Serve loop reads
// gets a sequence number, and a loop hands its faults to the handler only
// once every event read before its own batch has been handled.
type order struct {
	n    atomic.Int64 // events read and not yet handled; 0 keeps wait to one load
	mu   sync.Mutex
	cond sync.Cond
	next uint64              // sequence number of the next event read
	open map[uint64]struct{} // read, not yet handled
	shut bool                // Close has begun: nobody waits any more
}

func (o *order) init() {
	o.cond.L = &o.mu
	o.open = map[uint64]struct{}{}
}

// admit numbers the Remove and Unmap events of a batch just read, in place
// (Event.seq), and returns the batch's barrier: the faults of the batch wait
// for every event numbered below it. Called with the read serialized.
func (o *order) admit(evs []Event) (barrier uint64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	barrier = o.next
	for i := range evs {
		if evs[i].Kind != PageFault {
			o.next++
			evs[i].seq = o.next // 1-based: 0 means "not numbered"
			o.open[evs[i].seq] = struct{}{}
			o.n.Add(1)
		}
	}
	return barrier
}

// done records that the handler has returned for a numbered event.
func (o *order) done(ev Event) {
	if ev.seq == 0 {
		return
	}
	o.mu.Lock()
	delete(o.open, ev.seq)
	o.n.Add(-1)
	o.mu.Unlock()
	o.cond.Broadcast()
}

// wait blocks until every event numbered up to barrier has been handled, or
// Close has begun.
func (o *order) wait(barrier uint64) {
	if o.n.Load() == 0 {
		return
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	for !o.shut && o.pendingUpTo(barrier) {
		o.cond.Wait()
	}
}

func (o *order) pendingUpTo(barrier uint64) bool {
	for seq := range o.open {
		if seq <= barrier {
			return true
		}
	}
	return false
}

// shutdown releases every waiter, for Close.
func (o *order) shutdown() {
	o.mu.Lock()
	o.shut = true
	o.mu.Unlock()
	o.cond.Broadcast()
}
