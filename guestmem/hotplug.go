package guestmem

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/kvm"
)

// ErrHotplugSpace is returned by AddRegion when a memfd or hugetlb backing
// has no room left for the region (see WithHotplug).
var ErrHotplugSpace = errors.New("no hotplug space left in the backing")

// ErrNoRegion is returned by RemoveRegion for an address that does not start
// a region.
var ErrNoRegion = errors.New("no region starts at this address")

// maxHotplug bounds WithHotplug: the memfd is sized for it up front (sparse).
const maxHotplug = 1 << 46

// WithHotplug reserves n bytes (rounded up to 2 MiB) of backing for regions
// added later with AddRegion. A memfd's size is sealed, so Memfd and Hugetlb
// backings need this room up front; it costs nothing until used (the memfd
// is sparse). Anonymous memory needs no reservation. A File backing cannot
// hot-add.
func WithHotplug(n uint64) Option { return func(c *config) { c.hotplug = n } }

type fdRange struct{ off, n int64 }

// hotplugSpace is the free part of the backing fd, first fit.
type hotplugSpace struct{ free []fdRange }

func (h *hotplugSpace) alloc(n, align int64) (int64, bool) {
	for i, f := range h.free {
		start := (f.off + align - 1) &^ (align - 1)
		if start+n > f.off+f.n {
			continue
		}
		var rest []fdRange
		if start > f.off {
			rest = append(rest, fdRange{f.off, start - f.off})
		}
		if end := f.off + f.n; start+n < end {
			rest = append(rest, fdRange{start + n, end - start - n})
		}
		h.free = slices.Replace(h.free, i, i+1, rest...)
		return start, true
	}
	return 0, false
}

func (h *hotplugSpace) release(off, n int64) {
	h.free = append(h.free, fdRange{off, n})
	slices.SortFunc(h.free, func(a, b fdRange) int { return cmp.Compare(a.off, b.off) })
	merged := h.free[:1]
	for _, f := range h.free[1:] {
		last := &merged[len(merged)-1]
		if last.off+last.n == f.off {
			last.n += f.n
		} else {
			merged = append(merged, f)
		}
	}
	h.free = merged
}

// AddRegion adds a region of guest RAM while the guest may be running. The
// region gets an arena of its own (with guard gaps), is mapped with the
// Memory's backing, defaults and dirty tracking, and, when the Memory is
// registered, a KVM slot — all before it is published: the region table is
// replaced with one atomic store, so accesses never see it half-added. On
// any error nothing changes. Overlap, alignment and address-space errors are
// *LayoutError as from New; no room in a memfd backing is ErrHotplugSpace.
func (m *Memory) AddRegion(spec RegionSpec) (Region, error) {
	if err := m.lock("AddRegion", true); err != nil {
		return Region{}, err
	}
	defer m.wmu.Unlock()
	t := m.tab.Load()
	if t.closed {
		return Region{}, closedErr("AddRegion")
	}
	if m.restoring() != nil {
		return Region{}, fmt.Errorf("guestmem: AddRegion: %w: wait for it (OnDemand.Wait)", ErrRestoring)
	}
	if m.migrating.Load() {
		return Region{}, fmt.Errorf("guestmem: AddRegion: %w", ErrMigrating)
	}
	if m.backing == File {
		return Region{}, fmt.Errorf("guestmem: AddRegion: %w: a File backing cannot hot-add", ErrBacking)
	}
	if m.gmem != nil {
		if err := gmemLayout(Layout{spec}); err != nil {
			return Region{}, fmt.Errorf("guestmem: AddRegion: %w", err)
		}
	}
	l := make(Layout, 0, len(t.regions)+1)
	for _, r := range t.regions {
		l = append(l, RegionSpec{GPA: r.GPA, Size: r.Size, ReadOnly: r.ReadOnly})
	}
	l = append(l, spec)
	if err := l.Validate(m.pageSize, m.top); err != nil {
		var le *LayoutError
		if errors.As(err, &le) && le.Index != len(l)-1 && le.Other == len(l)-1 {
			le.Index, le.Other, le.Region = le.Other, le.Index, spec // name the new region first
		}
		return Region{}, withOp("AddRegion", err)
	}
	align := max(uint64(hostAlign), m.pageSize)
	r := region{GPA: spec.GPA, Size: spec.Size, ReadOnly: spec.ReadOnly, FDOffset: -1,
		hotplugged: true, arenaOff: int64(m.guard), pin: &pinState{}}
	if m.backing != Anonymous {
		off, ok := m.hot.alloc(int64(alignUp(spec.Size, align)), int64(align))
		if !ok {
			return Region{}, fmt.Errorf("guestmem: AddRegion [%v, +%#x): %w (reserve room with WithHotplug)",
				spec.GPA, spec.Size, ErrHotplugSpace)
		}
		r.FDOffset = off
	}
	fail := func(err error) (Region, error) {
		if r.FDOffset >= 0 {
			m.hot.release(r.FDOffset, int64(alignUp(r.Size, align)))
		}
		return Region{}, err
	}
	a, err := arena.New(int64(alignUp(spec.Size, align)+2*m.guard), arena.ArenaAlign(int64(align)))
	if err != nil {
		return fail(fmt.Errorf("guestmem: AddRegion: reserving host address space: %w", err))
	}
	r.host = a
	if err := m.mapRegion("AddRegion", &r); err != nil {
		return fail(errors.Join(err, a.Close()))
	}
	if m.tracking {
		r.dirty = newDirtyBits(r.Size)
	}
	if m.reg != nil {
		if err := m.addSlot(r); err != nil {
			return fail(errors.Join(fmt.Errorf("guestmem: AddRegion: registering [%v, +%#x): %w", r.GPA, r.Size, err),
				a.Close()))
		}
	}
	regions := append(slices.Clone(t.regions), r)
	slices.SortFunc(regions, func(a, b region) int { return cmpAddr(a.GPA, b.GPA) })
	m.publishSlots()
	m.publish(&table{regions: regions})
	slot := -1
	if id, ok := m.reg.slot(r.GPA); ok {
		slot = int(id)
	}
	return r.view(slot), nil
}

// RemoveRegion removes the region starting at gpa (hot-added or from New)
// while the guest may be running. In order: its KVM slot is deleted, so no
// vCPU reaches it any more (a guest access becomes an MMIO exit); the region
// table without it is published and accesses still using the old table
// drain; only then is its host memory unmapped and its backing released
// (a hole punched in a memfd). If deleting the slot fails, nothing changes.
func (m *Memory) RemoveRegion(gpa GuestAddress) error {
	if err := m.lock("RemoveRegion", true); err != nil {
		return err
	}
	defer m.wmu.Unlock()
	t := m.tab.Load()
	if t.closed {
		return closedErr("RemoveRegion")
	}
	if m.restoring() != nil {
		return fmt.Errorf("guestmem: RemoveRegion: %w: wait for it (OnDemand.Wait)", ErrRestoring)
	}
	if m.migrating.Load() {
		return fmt.Errorf("guestmem: RemoveRegion: %w", ErrMigrating)
	}
	i, ok := t.find(gpa)
	if !ok || t.regions[i].GPA != gpa {
		return &AddressError{Op: "RemoveRegion", GPA: gpa, Err: ErrNoRegion}
	}
	r := t.regions[i]
	if err := takeAway("RemoveRegion", t.regions[i:i+1]); err != nil {
		return err
	}
	if id, ok := m.reg.slot(r.GPA); ok {
		if err := m.reg.vm.DeleteSlot(id); err != nil && !errors.Is(err, kvm.ErrClosed) {
			giveBack(t.regions[i : i+1])
			return fmt.Errorf("guestmem: RemoveRegion at %v: %w", gpa, err)
		}
		delete(m.reg.slots, r.GPA)
		m.publishSlots()
	}
	m.publish(&table{regions: slices.Delete(slices.Clone(t.regions), i, i+1)})
	var err error
	if r.hotplugged {
		err = r.host.Close()
	} else {
		err = r.host.RemoveMapping(r.arenaOff, int64(r.Size))
	}
	if r.FDOffset >= 0 && m.backing != File {
		align := int64(max(uint64(hostAlign), m.pageSize))
		n := int64(alignUp(r.Size, uint64(align)))
		if perr := unix.Fallocate(m.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, r.FDOffset, n); perr != nil {
			err = errors.Join(err, os.NewSyscallError("fallocate", perr))
		} else {
			m.hot.release(r.FDOffset, n)
		}
	}
	if err != nil {
		return fmt.Errorf("guestmem: RemoveRegion at %v: releasing host memory: %w", gpa, err)
	}
	return nil
}
