package vhostuser

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"sync"

	"github.com/gmem-vmm/gmem/guestmem"
)

// Exporter hands a guestmem.Memory to a vhost-user back end: its region
// table (SET_MEM_TABLE, or ADD_MEM_REG per region), the regions hot-added
// and removed through it (ADD_MEM_REG / REM_MEM_REG), and a shared dirty
// log (SET_LOG_BASE) that the Memory's CollectDirty and Save merge. It is
// safe for concurrent use, and with CollectDirty running concurrently.
//
// Hotplug must go through the Exporter's AddRegion and RemoveRegion: a
// region added to the Memory directly is not seen by the back end, and one
// removed directly is released while the back end may still map it.
type Exporter struct {
	mu      sync.Mutex // serializes table changes and Close
	f       *Frontend
	m       *guestmem.Memory
	regions []MemoryRegion // what the back end has, lowest address first
	closed  bool

	logMu sync.Mutex // guards log; a leaf lock, taken under the Memory's (TakeDirty)
	log   *dirtyLog
}

// Export sends m's region table to the back end behind f: each region's
// guest address, size, host address in this process and offset in m's
// backing fd, with that fd. Memory another process cannot map — Anonymous
// (private) and File (mapped privately) backings — is refused with
// ErrNotShareable before anything is sent. Up to 8 regions go in one
// SET_MEM_TABLE; more need CONFIGURE_MEM_SLOTS and go one ADD_MEM_REG each,
// up to the back end's MaxMemSlots (else ErrTooManyRegions); if one of
// those fails, the back end keeps the regions it took before, and the
// connection should be dropped. The Exporter uses m's fd: Close it before
// closing m.
func Export(m *guestmem.Memory, f *Frontend) (*Exporter, error) {
	if err := shareable(m); err != nil {
		return nil, err
	}
	e := &Exporter{f: f, m: m}
	var regions []MemoryRegion
	for _, r := range m.Regions() {
		regions = append(regions, wireRegion(r))
	}
	if len(regions) > MaxRegions && f.ProtocolFeatures()&ProtocolConfigureMemSlots == 0 {
		return nil, fmt.Errorf("vhostuser: Export: %d regions need CONFIGURE_MEM_SLOTS, which the back end "+
			"does not offer: %w", len(regions), ErrTooManyRegions)
	}
	if len(regions) > f.MaxMemSlots() {
		return nil, fmt.Errorf("vhostuser: Export: %d regions, the back end takes %d: %w", len(regions),
			f.MaxMemSlots(), ErrTooManyRegions)
	}
	if len(regions) <= MaxRegions {
		if err := e.sendTable(regions); err != nil {
			return nil, fmt.Errorf("vhostuser: Export: %w", err)
		}
	} else {
		for _, r := range regions {
			if err := f.AddMemReg(r, m.FD()); err != nil {
				return nil, fmt.Errorf("vhostuser: Export: %w", err)
			}
		}
	}
	e.regions = regions
	return e, nil
}

// shareable refuses memory whose pages another process's mapping of the
// backing fd would not see.
func shareable(m *guestmem.Memory) error {
	switch b := m.Backing(); b {
	case guestmem.Memfd, guestmem.Hugetlb, guestmem.GuestMemfd:
		if m.FD() < 0 {
			return fmt.Errorf("vhostuser: Export: the guest memory is closed: %w", fs.ErrClosed)
		}
		return nil
	case guestmem.Anonymous:
		return fmt.Errorf("%w: its backing is private anonymous memory, which has no fd; back it with "+
			"guestmem.WithMemfd() or WithHugetlb", ErrNotShareable)
	default:
		return fmt.Errorf("%w: its %v backing is mapped privately (copy-on-write), so the guest's writes never "+
			"reach the fd; back it with guestmem.WithMemfd() or WithHugetlb", ErrNotShareable, b)
	}
}

func wireRegion(r guestmem.Region) MemoryRegion {
	return MemoryRegion{GuestPhysAddr: uint64(r.GPA), MemorySize: r.Size, UserspaceAddr: uint64(r.HostAddr),
		MmapOffset: uint64(r.FDOffset)}
}

// sendTable sends the whole table with SET_MEM_TABLE, m's fd once per region.
func (e *Exporter) sendTable(regions []MemoryRegion) error {
	fd := e.m.FD()
	fds := make([]int, len(regions))
	for i := range fds {
		fds[i] = fd
	}
	return e.f.SetMemTable(regions, fds)
}

// useSlots reports whether changes go as ADD_MEM_REG / REM_MEM_REG rather
// than a new SET_MEM_TABLE.
func (e *Exporter) useSlots() bool {
	return e.f.ProtocolFeatures()&ProtocolConfigureMemSlots != 0
}

// maxRegions is how many regions the back end can be given.
func (e *Exporter) maxRegions() int {
	if e.useSlots() {
		return e.f.MaxMemSlots()
	}
	return MaxRegions
}

// Regions returns the table the back end was given, lowest address first.
func (e *Exporter) Regions() []MemoryRegion {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.regions)
}

func (e *Exporter) checkOpen(op string) error {
	if e.closed {
		return fmt.Errorf("vhostuser: %s: the exporter is closed: %w", op, fs.ErrClosed)
	}
	return nil
}

// AddRegion adds a region to the guest memory (guestmem.Memory.AddRegion)
// and then to the back end: with ADD_MEM_REG, or without CONFIGURE_MEM_SLOTS
// a new SET_MEM_TABLE. When the dirty log is on and the region lies past
// what it covers, a larger log is sent first, so the back end never writes
// the region unlogged. If the back end cannot be told, the region is
// removed again and the error returned; a table already full
// (ErrTooManyRegions) is refused before the region is added.
func (e *Exporter) AddRegion(spec guestmem.RegionSpec) (guestmem.Region, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen("AddRegion"); err != nil {
		return guestmem.Region{}, err
	}
	if len(e.regions) >= e.maxRegions() {
		return guestmem.Region{}, fmt.Errorf("vhostuser: AddRegion: the back end has %d regions, its most: %w",
			len(e.regions), ErrTooManyRegions)
	}
	r, err := e.m.AddRegion(spec)
	if err != nil {
		return guestmem.Region{}, err
	}
	wr := wireRegion(r)
	table := append(slices.Clone(e.regions), wr)
	slices.SortFunc(table, func(a, b MemoryRegion) int { return cmp.Compare(a.GuestPhysAddr, b.GuestPhysAddr) })
	err = e.growLog(wr.End())
	if err == nil {
		if e.useSlots() {
			err = e.f.AddMemReg(wr, e.m.FD())
		} else {
			err = e.sendTable(table)
		}
	}
	if err != nil {
		return guestmem.Region{}, errors.Join(fmt.Errorf("vhostuser: AddRegion: telling the back end: %w", err),
			e.m.RemoveRegion(r.GPA))
	}
	e.regions = table
	return r, nil
}

// RemoveRegion removes the region starting at gpa from the back end and
// then from the guest memory (guestmem.Memory.RemoveRegion). The back end
// is told first — REM_MEM_REG, or a SET_MEM_TABLE without it — and the call
// waits until it has processed that (REPLY_ACK, or a GET_FEATURES round
// trip), so guest memory is released only after the back end let go of it.
// If the Memory then refuses (a pinned region, say), the back end gets the
// region back and the Memory's error is returned.
func (e *Exporter) RemoveRegion(gpa guestmem.GuestAddress) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen("RemoveRegion"); err != nil {
		return err
	}
	i := slices.IndexFunc(e.regions, func(r MemoryRegion) bool { return r.GuestPhysAddr == uint64(gpa) })
	if i < 0 {
		return e.m.RemoveRegion(gpa) // not the back end's: guestmem says why
	}
	wr := e.regions[i]
	table := slices.Delete(slices.Clone(e.regions), i, i+1)
	var err error
	if e.useSlots() {
		err = e.f.RemMemReg(wr)
	} else {
		err = e.sendTable(table)
	}
	if err != nil {
		return fmt.Errorf("vhostuser: RemoveRegion at %#x: telling the back end: %w", uint64(gpa), err)
	}
	e.regions = table
	if err := e.m.RemoveRegion(gpa); err != nil {
		var back error
		if e.useSlots() {
			back = e.f.AddMemReg(wr, e.m.FD())
		} else {
			back = e.sendTable(append(slices.Clone(table[:i]), append([]MemoryRegion{wr}, table[i:]...)...))
		}
		if back == nil {
			e.regions = slices.Insert(table, i, wr)
		}
		return errors.Join(err, back)
	}
	return nil
}

// EnableDirtyLog gives the back end a dirty log (SET_LOG_BASE with a new
// memfd): one bit per 4 KiB guest page from address 0 up to the highest
// region, which it sets as it writes guest RAM, and which the Memory's
// CollectDirty and Save merge from then on (guestmem.DirtySource). It needs
// LOG_SHMFD. A real back end logs only while FeatureLogAll is among the
// features of SET_FEATURES, which the caller sends. Calling it again does
// nothing.
func (e *Exporter) EnableDirtyLog() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen("EnableDirtyLog"); err != nil {
		return err
	}
	e.logMu.Lock()
	on := e.log != nil
	e.logMu.Unlock()
	if on {
		return nil
	}
	var end uint64
	for _, r := range e.regions {
		end = max(end, r.End())
	}
	if err := e.replaceLog(end); err != nil {
		return err
	}
	if err := e.m.AttachDirtySource(e); err != nil {
		return err
	}
	return nil
}

// growLog replaces the log with one covering [0, end) when it is on and
// does not yet. The caller holds e.mu.
func (e *Exporter) growLog(end uint64) error {
	e.logMu.Lock()
	need := e.log != nil && !e.log.covers(end)
	var cur uint64
	if need {
		cur = e.log.size * 8 * LogPage
	}
	e.logMu.Unlock()
	if !need {
		return nil
	}
	return e.replaceLog(max(end, cur))
}

// replaceLog sends the back end a new log covering [0, end) and, once it
// has answered (so it writes only the new one), moves what the old one
// holds into it. The caller holds e.mu.
func (e *Exporter) replaceLog(end uint64) error {
	l, err := createLog(end)
	if err != nil {
		return err
	}
	if err := e.f.SetLogBase(l.area(), l.fd); err != nil {
		return errors.Join(fmt.Errorf("vhostuser: sending the dirty log: %w", err), l.close())
	}
	e.logMu.Lock()
	defer e.logMu.Unlock()
	old := e.log
	e.log = l
	if old == nil {
		return nil
	}
	return errors.Join(old.moveInto(l), old.close())
}

// TakeDirty implements guestmem.DirtySource: it reports the pages of the
// region [gpa, gpa+size) the back end marked in the shared log, and clears
// them there.
func (e *Exporter) TakeDirty(gpa guestmem.GuestAddress, size uint64, bits []uint64) {
	e.logMu.Lock()
	defer e.logMu.Unlock()
	if e.log != nil {
		e.log.take(uint64(gpa), size, bits)
	}
}

// Close stops merging the dirty log into the Memory and unmaps it. It does
// not close the Frontend, and the back end keeps the guest memory mapped
// until told otherwise or disconnected. Close is idempotent.
func (e *Exporter) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return nil
	}
	e.closed = true
	err := e.m.DetachDirtySource(e)
	e.logMu.Lock()
	defer e.logMu.Unlock()
	if e.log != nil {
		err = errors.Join(err, e.log.close())
		e.log = nil
	}
	return err
}
