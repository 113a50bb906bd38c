package guestmem

import (
	"runtime"
	"sort"
	"sync/atomic"
	"time"
)

// table is one immutable version of the region table. Readers load the
// current table with one atomic load and count themselves in it, so they
// never take a lock and never see a table half-updated; a writer builds a
// new table, publishes it with one atomic store, and waits for the old
// table's readers to drain before it releases anything only the old table
// referred to (vm-memory's GuestMemoryAtomic, with a reader count in place
// of Arc).
type table struct {
	regions []region // sorted by GPA
	closed  bool
	readers atomic.Int64
}

// acquire returns the current table with the caller counted as its reader;
// the caller must release it. After Close it returns ErrClosed.
func (m *Memory) acquire(op string) (*table, error) {
	for {
		t := m.tab.Load()
		if t.closed {
			return nil, closedErr(op)
		}
		t.readers.Add(1)
		if m.tab.Load() == t {
			return t, nil
		}
		t.readers.Add(-1) // a writer replaced it meanwhile: use the new one
	}
}

func (t *table) release() { t.readers.Add(-1) }

// publish makes t the current table and waits until no reader holds the
// one it replaced, which it returns. The caller holds m.wmu.
func (m *Memory) publish(t *table) *table {
	old := m.tab.Swap(t)
	for spin := 0; old.readers.Load() != 0; spin++ {
		if spin < 100 {
			runtime.Gosched()
		} else {
			time.Sleep(50 * time.Microsecond)
		}
	}
	return old
}

// find returns the index of the region containing a, in O(log n).
func (t *table) find(a GuestAddress) (int, bool) {
	i := sort.Search(len(t.regions), func(i int) bool { return t.regions[i].End() > a })
	return i, i < len(t.regions) && t.regions[i].contains(a)
}
