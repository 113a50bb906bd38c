package guestmem

import "fmt"

// DirtySource is dirty state kept outside guestmem — the shared log a
// vhost-user back end sets bits in as it writes guest RAM — that
// CollectDirty (and Save) merge into the dirty set.
type DirtySource interface {
	// TakeDirty ORs into bits the pages of the region [gpa, gpa+size)
	// dirtied since the last call and clears them at the source. Bit b of
	// bits[w] is the region's page w*64+b, in 4 KiB pages from gpa; bits
	// has room for every page of the region. It runs while CollectDirty
	// holds the memory: a call back into the Memory that would wait for it
	// (CollectDirty, AddRegion, ...) fails with ErrReentered.
	TakeDirty(gpa GuestAddress, size uint64, bits []uint64)
}

// AttachDirtySource makes CollectDirty and Save merge what src reports, for
// every region, with KVM's log and guestmem's own writes. When dirty
// tracking starts, src is drained, so pages dirtied before are not reported.
// Attaching a source twice attaches it once.
func (m *Memory) AttachDirtySource(src DirtySource) error {
	if src == nil {
		return fmt.Errorf("guestmem: AttachDirtySource: nil source: %w", ErrBadOption)
	}
	if err := m.lock("AttachDirtySource", false); err != nil {
		return err
	}
	defer m.wmu.Unlock()
	if m.tab.Load().closed {
		return closedErr("AttachDirtySource")
	}
	for _, s := range m.external {
		if s == src {
			return nil
		}
	}
	m.external = append(m.external, src)
	return nil
}

// DetachDirtySource stops merging src; detaching a source not attached does
// nothing.
func (m *Memory) DetachDirtySource(src DirtySource) error {
	if err := m.lock("DetachDirtySource", false); err != nil {
		return err
	}
	defer m.wmu.Unlock()
	for i, s := range m.external {
		if s == src {
			m.external = append(m.external[:i:i], m.external[i+1:]...)
			break
		}
	}
	return nil
}

// takeExternal ORs the external sources' bits for r into bits and returns
// it, sized for r's pages (and zeroed first when it came in empty, that is,
// without KVM's log). The caller holds m.wmu and the table.
func (m *Memory) takeExternal(op string, r region, bits []uint64) []uint64 {
	if len(m.external) == 0 {
		return bits
	}
	words := len(r.dirty.w)
	if len(bits) == 0 {
		if cap(bits) < words {
			bits = make([]uint64, words)
		}
		bits = bits[:words]
		clear(bits)
	}
	m.inSave.Enter(op) // the sources run holding wmu
	defer m.inSave.Leave()
	m.inCallback.Enter(op) // and the table
	defer m.inCallback.Leave()
	for _, s := range m.external {
		s.TakeDirty(r.GPA, r.Size, bits)
	}
	return bits
}

// drainExternal discards what the external sources hold for regions, as
// tracking starts. The caller holds m.wmu and the table.
func (m *Memory) drainExternal(regions []region) {
	var scratch []uint64
	for _, r := range regions {
		scratch = m.takeExternal("StartDirtyTracking", r, scratch[:0])
	}
}
