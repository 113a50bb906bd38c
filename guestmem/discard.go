package guestmem

import (
	"errors"
	"fmt"

	"github.com/gmem-vmm/gmem/arena"
)

// ErrReadOnly is returned by Discard for a range in a read-only region.
var ErrReadOnly = errors.New("region is read-only")

// Discard returns the guest pages [a, a+n) to the host, as a balloon device
// does: memfd, hugetlb and guest_memfd backings get a hole punched
// (MADV_REMOVE), so the file's pages are freed (and KVM unmaps them from the
// guest); anonymous memory is dropped (MADV_DONTNEED); a
// private file mapping (File backing, lazy restore) is replaced by fresh
// anonymous memory, so the file is never written. Afterwards the guest and
// the host read zeros there and host memory use falls accordingly. The range
// must be guest RAM (it may cross contiguous regions) and aligned to the
// page size. A read-only region is ErrReadOnly; locked pages (LockOnFault)
// are an error wrapping ErrLocked, saying to Unlock first. While dirty
// tracking is on, the discarded pages count as dirty: they changed to zero.
func (m *Memory) Discard(a GuestAddress, n uint64) error {
	const op = "Discard"
	t, err := m.acquire(op)
	if err != nil {
		return err
	}
	defer t.release()
	if n == 0 {
		return &AddressError{Op: op, GPA: a, Err: fmt.Errorf("%w: nothing to discard", ErrZeroSize)}
	}
	if uint64(a)%m.pageSize != 0 || n%m.pageSize != 0 {
		return &AddressError{Op: op, GPA: a, Len: n, Err: fmt.Errorf("%w (page size %#x)", ErrUnaligned, m.pageSize)}
	}
	pieces, err := t.resolve(op, a, n)
	if err != nil {
		return err
	}
	if m.backing == File || m.overlay {
		// Remapping waits for the arena's accesses in flight, which a
		// callback of this goroutine may be inside.
		if err := m.inCallback.Check(op); err != nil {
			return fmt.Errorf("guestmem: %w", err)
		}
	}
	for _, pc := range pieces {
		if t.regions[pc.region].ReadOnly {
			return &AddressError{Op: op, GPA: pc.gpa, Len: n, Err: ErrReadOnly}
		}
		st, err := pc.a.StatsRange(pc.off, pc.n)
		if err != nil {
			return pc.inGuestTerms(op, err)
		}
		if st.AnyFlag("lo") {
			return &AddressError{Op: op, GPA: pc.gpa, Len: n,
				Err: fmt.Errorf("%w: locked pages cannot be discarded; call Unlock first", arena.ErrLocked)}
		}
	}
	work := func() error { return m.discardPieces(t, pieces) }
	if od := m.restoring(); od != nil {
		// Not yet filled parts must stay zero when they are.
		return od.discard(a, n, work)
	}
	return work()
}

// discardPieces drops the pieces' pages.
func (m *Memory) discardPieces(t *table, pieces []piece) error {
	const op = "Discard"
	for _, pc := range pieces {
		var err error
		switch {
		case m.backing == Memfd || m.backing == Hugetlb || m.backing == GuestMemfd:
			err = pc.a.RemoveRange(pc.off, pc.n)
		case m.backing == Anonymous && !m.overlay:
			err = pc.a.DropPageCache(pc.off, pc.n)
		default: // private file mapping: dropping would bring the file's data back
			err = pc.a.AddAnonMapping(pc.off, pc.n, arena.ProtReadWrite, arena.Private(), arena.NoReserve(),
				arena.Replace())
			if err == nil {
				err = m.applyDefaults(pc.a, pc.off, pc.n)
			}
		}
		t.markDirty(pc, pc.n)
		if err != nil {
			return pc.inGuestTerms(op, err)
		}
	}
	return nil
}
