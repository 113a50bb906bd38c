package guestmem

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"slices"
	"sort"
	"sync"
)

// Post-copy (docs/migration.md): at the pause, instead of sending the last
// dirty pages, the sender sends their list; the receiver drops its stale
// copies, registers its memory with a userfaultfd and returns at once, so
// the guest runs on the destination while the sender pushes the pages in
// address order and sends first any the destination faults on.

// ErrPostCopyLost is wrapped by the errors of a post-copy migration whose
// connection failed after the switchover. The guest's state is split: the
// destination may have run, and the source holds pages the destination
// never got. The source must not be resumed (Migrate does not), and the
// destination stops: its missing pages are fenced off (see OnDemand).
var ErrPostCopyLost = errors.New("post-copy migration lost its connection: the guest's state is split")

const (
	pcopyMagic  = "GMEMPCP\x00" // the switchover block: the units to be fetched
	pcDataMagic = "GMEMPCD\x00" // one unit's data
	pcDataSize  = 32
	ackRequest  = 2 // an acknowledgement frame that asks for a unit (round: its index)
	maxPCUnits  = 1 << 24
)

// postCopyUnits returns the units a post-copy switchover sends: the dirty
// pages widened to aligned blocks of unit bytes, clipped to their region,
// merged where they touch within one.
func postCopyUnits(regions []region, d *DirtySet, unit uint64) []Span {
	var out []Span
	for _, s := range d.spans {
		i := sort.Search(len(regions), func(i int) bool { return regions[i].End() > s.GPA })
		if i == len(regions) {
			continue
		}
		r := regions[i]
		lo := max(r.GPA, GuestAddress(uint64(s.GPA)/unit*unit))
		hi := min(r.End(), GuestAddress(alignUp(uint64(s.End()), unit)))
		if k := len(out); k > 0 && out[k-1].End() >= lo && out[k-1].GPA >= r.GPA {
			if hi > out[k-1].End() {
				out[k-1].Size = uint64(hi - out[k-1].GPA)
			}
			continue
		}
		out = append(out, Span{GPA: lo, Size: uint64(hi - lo)})
	}
	// Split into units, so a fault fetches one.
	var units []Span
	for _, s := range out {
		for pos := s.GPA; pos < s.End(); {
			next := min(s.End(), GuestAddress((uint64(pos)/unit+1)*unit))
			units = append(units, Span{GPA: pos, Size: uint64(next - pos)})
			pos = next
		}
	}
	return units
}

// pcopyBlock encodes the switchover block: a 4096-byte head (magic, unit
// count u32, crc u32 of the whole block), then the units (GPA u64, size u64),
// padded to a multiple of 4096.
func pcopyBlock(units []Span) []byte {
	n := alignUp(uint64(32+16*len(units)), blockSize)
	b := make([]byte, n)
	le := binary.LittleEndian
	copy(b, pcopyMagic)
	le.PutUint32(b[8:], uint32(len(units)))
	for i, u := range units {
		le.PutUint64(b[32+16*i:], uint64(u.GPA))
		le.PutUint64(b[40+16*i:], u.Size)
	}
	le.PutUint32(b[12:], blockCRC(b, 12))
	return b
}

func readPcopy(r io.Reader) ([]Span, error) {
	head := make([]byte, 32)
	if _, err := io.ReadFull(r, head); err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	count := le.Uint32(head[8:])
	if count > maxPCUnits {
		return nil, fmt.Errorf("%w: post-copy block of %d units", ErrMigrationProtocol, count)
	}
	b := make([]byte, alignUp(uint64(32+16*int(count)), blockSize))
	copy(b, head)
	if _, err := io.ReadFull(r, b[32:]); err != nil {
		return nil, err
	}
	if blockCRC(b, 12) != le.Uint32(b[12:]) {
		return nil, fmt.Errorf("%w: post-copy block checksum", ErrMigrationProtocol)
	}
	units := make([]Span, count)
	for i := range units {
		units[i] = Span{GPA: GuestAddress(le.Uint64(b[32+16*i:])), Size: le.Uint64(b[40+16*i:])}
		if units[i].Size == 0 || units[i].Size > 1<<30 || uint64(units[i].GPA)%dirtyPage != 0 ||
			units[i].Size%dirtyPage != 0 {
			return nil, fmt.Errorf("%w: post-copy unit %d [%v, +%#x)", ErrMigrationProtocol, i, units[i].GPA,
				units[i].Size)
		}
	}
	return units, nil
}

// sendPostCopy runs the sender's side after the switchover block: it
// pushes every unit in order, a requested one first, then ends the stream.
// The guest is paused, so the data is stable.
func (m *Memory) sendPostCopy(ctx context.Context, s *stream, units []Span) (int64, error) {
	t, err := m.acquire("Migrate")
	if err != nil {
		return 0, err
	}
	defer t.release()
	m.inCallback.Enter("Migrate") // the connection's Write runs holding t
	defer m.inCallback.Leave()
	sent := make([]bool, len(units))
	var bytes int64
	send := func(i int) error {
		if sent[i] {
			return nil
		}
		sent[i] = true
		u := units[i]
		b := make([]byte, pcDataSize, pcDataSize+u.Size)
		a := appender(b)
		if _, err := t.copyTo("Migrate", &a, u.GPA, u.Size); err != nil {
			return err
		}
		b = a
		le := binary.LittleEndian
		copy(b, pcDataMagic)
		le.PutUint32(b[8:], uint32(i))
		le.PutUint32(b[12:], crc32.Checksum(b[pcDataSize:], castagnoli))
		le.PutUint64(b[16:], u.Size)
		if _, err := s.w.Write(b); err != nil {
			return s.failed(err)
		}
		bytes += int64(len(b))
		return nil
	}
	next := 0
	for next < len(units) {
		if err := ctx.Err(); err != nil {
			return bytes, err
		}
		select {
		case i := <-s.requests:
			if i >= 0 && i < len(units) {
				if err := send(i); err != nil {
					return bytes, err
				}
				if err := s.w.Flush(); err != nil { // a faulting vCPU waits for it
					return bytes, s.failed(err)
				}
			}
			continue
		case a := <-s.acks:
			s.acks <- a
			if a.err != nil {
				return bytes, a.err
			}
		default:
		}
		if err := send(next); err != nil {
			return bytes, err
		}
		next++
		if s.w.Buffered() == 0 || next%16 == 0 {
			if err := s.w.Flush(); err != nil {
				return bytes, s.failed(err)
			}
		}
	}
	if _, err := s.w.Write(finBlock(s.parts)); err != nil {
		return bytes, s.failed(err)
	}
	if err := s.w.Flush(); err != nil {
		return bytes, s.failed(err)
	}
	return bytes, s.ack(finRound)
}

// incoming is the receiver's side of a post-copy: it asks the sender for
// the units the guest or the host needs, and installs what arrives.
type incoming struct {
	od     *OnDemand
	w      io.Writer
	wmu    sync.Mutex // serializes requests
	pmu    sync.Mutex
	pushed map[int32][]byte      // units that arrived before anyone needed them
	wait   map[int32]chan []byte // units a fill waits for
	asked  map[int32]bool        // units requested
	seen   map[int32]bool        // units received
	got    int                   // len(seen)
	failed chan struct{}         // closed when the stream fails
	err    error                 // why (set before failed is closed)
}

// fetch is the OnDemand fetch of a post-copy: the unit's data, pushed
// already or asked for now.
func (in *incoming) fetch(c *cluster, buf []byte, sub []bool) error {
	in.pmu.Lock()
	if d, ok := in.pushed[c.idx]; ok {
		delete(in.pushed, c.idx)
		in.pmu.Unlock()
		return in.take(d, buf, sub)
	}
	ch := make(chan []byte, 1)
	in.wait[c.idx] = ch
	ask := !in.asked[c.idx]
	in.asked[c.idx] = true
	in.pmu.Unlock()
	if ask {
		in.wmu.Lock()
		_, err := in.w.Write(frame(uint32(c.idx), ackRequest, nil))
		in.wmu.Unlock()
		if err != nil {
			return fmt.Errorf("%w: %w", ErrPostCopyLost, err)
		}
	}
	select {
	case d := <-ch:
		return in.take(d, buf, sub)
	case <-in.failed:
		return in.err
	case <-in.od.fillCtx.Done():
		return in.od.cause(in.od.fillCtx.Err())
	}
}

func (in *incoming) take(d []byte, buf []byte, sub []bool) error {
	if len(d) != len(buf) {
		return fmt.Errorf("%w: a unit of %d bytes for %d", ErrMigrationProtocol, len(d), len(buf))
	}
	copy(buf, d)
	for i := range sub {
		sub[i] = true
	}
	return nil
}

// deliver hands a unit's data to the fill waiting for it, or keeps it and
// installs it now if nobody is filling it.
func (in *incoming) deliver(idx int32, d []byte) {
	in.pmu.Lock()
	if !in.seen[idx] {
		in.seen[idx] = true
		in.got++
	}
	if ch, ok := in.wait[idx]; ok {
		delete(in.wait, idx)
		in.pmu.Unlock()
		ch <- d
		return
	}
	in.pushed[idx] = d
	in.pmu.Unlock()
	c := &in.od.clusters[idx]
	if c.state.Load() == clusterMissing && c.mu.TryLock() {
		if c.state.Load() == clusterMissing {
			_, _ = in.od.fill(c, &in.od.prefetched) // a failure fails the restore
		}
		in.od.unlock(c)
	}
}

// readData reads the sender's unit frames until its FIN block, then
// acknowledges it once every unit is in.
func (in *incoming) readData(r *bufio.Reader, w io.Writer, parts uint32) error {
	le := binary.LittleEndian
	for {
		magic, err := r.Peek(8)
		if err != nil {
			return err
		}
		switch string(magic) {
		case finMagic:
			b := make([]byte, blockSize)
			if _, err := io.ReadFull(r, b); err != nil {
				return err
			}
			if blockCRC(b, 12) != le.Uint32(b[12:]) || le.Uint32(b[8:]) != parts {
				return fmt.Errorf("%w: bad FIN block after post-copy", ErrMigrationProtocol)
			}
			in.pmu.Lock()
			got := in.got
			in.pmu.Unlock()
			if got != len(in.od.clusters) {
				// A fill waiting for a unit that will never come would hang.
				return fmt.Errorf("%w: FIN after %d of %d post-copy units", ErrMigrationProtocol, got,
					len(in.od.clusters))
			}
			if err := in.od.Fill(context.Background()); err != nil { // everything arrived: install what is left
				return err
			}
			in.wmu.Lock()
			_, err := w.Write(ackFrame(finRound, nil))
			in.wmu.Unlock()
			return err
		case pcDataMagic:
		default:
			return fmt.Errorf("%w: expected post-copy data", ErrMigrationProtocol)
		}
		h := make([]byte, pcDataSize)
		if _, err := io.ReadFull(r, h); err != nil {
			return err
		}
		idx, crc, n := le.Uint32(h[8:]), le.Uint32(h[12:]), le.Uint64(h[16:])
		if int(idx) >= len(in.od.clusters) || n != in.od.clusters[idx].n {
			return fmt.Errorf("%w: post-copy data for unit %d of %d bytes", ErrMigrationProtocol, idx, n)
		}
		d := make([]byte, n)
		if _, err := io.ReadFull(r, d); err != nil {
			return err
		}
		if crc32.Checksum(d, castagnoli) != crc {
			return fmt.Errorf("%w: post-copy data of unit %d", ErrSnapshotChecksum, idx)
		}
		in.deliver(int32(idx), d)
	}
}

// startPostCopy turns m, holding what the rounds sent, into memory served by
// userfaultfd for units: their stale pages are dropped, the memory
// registered, and the data read from r as the sender pushes it.
func startPostCopy(m *Memory, units []Span, r *bufio.Reader, w io.Writer, parts uint32,
	onFail func(error)) (*OnDemand, error) {
	od := &OnDemand{m: m, done: make(chan struct{}), wsDone: make(chan struct{}), onFail: onFail, postCopy: true,
		pageSize: m.pageSize}
	od.fillCtx, od.fillCancel = context.WithCancel(context.Background())
	od.regions = slices.Clone(m.tab.Load().regions)
	for i, u := range units {
		ri := od.regionOf(u.GPA)
		if ri == len(od.regions) || !od.regions[ri].contains(u.GPA) || u.End() > od.regions[ri].End() ||
			uint64(u.GPA-od.regions[ri].GPA)%m.pageSize != 0 || u.Size%m.pageSize != 0 ||
			i > 0 && u.GPA < units[i-1].End() {
			od.fillCancel()
			return nil, fmt.Errorf("%w: post-copy unit [%v, +%#x) is not pages of one region, in order",
				ErrMigrationProtocol, u.GPA, u.Size)
		}
		reg := od.regions[ri]
		od.clusters = append(od.clusters, cluster{gpa: u.GPA, n: u.Size, region: ri, idx: int32(i),
			host: reg.HostAddr + uintptr(u.GPA-reg.GPA)})
		od.dataBytes += u.Size
	}
	od.remaining.Store(int64(len(od.clusters)))
	// The receiver's copies of these pages are stale: drop them, so that
	// they fault.
	t, err := m.acquire("ReceiveMigration")
	if err != nil {
		od.fillCancel()
		return nil, err
	}
	for _, u := range units {
		pieces, err := t.resolve("ReceiveMigration", u.GPA, u.Size)
		if err == nil {
			err = m.discardPieces(t, pieces)
		}
		if err != nil {
			t.release()
			od.fillCancel()
			return nil, err
		}
	}
	t.release()
	in := &incoming{od: od, w: w, pushed: map[int32][]byte{}, wait: map[int32]chan []byte{}, asked: map[int32]bool{}, seen: map[int32]bool{},
		failed: make(chan struct{})}
	od.fetchFn = in.fetch
	if err := od.start(OnDemandOptions{Fillers: -1}); err != nil {
		od.fillCancel()
		return nil, err
	}
	if od.remaining.Load() == 0 {
		od.finish()
	} else {
		m.od.Store(od)
	}
	// Tell the sender the guest may run here now.
	if _, err := w.Write(ackFrame(parts, nil)); err != nil {
		od.close()
		return nil, fmt.Errorf("%w: %w", ErrPostCopyLost, err)
	}
	go func() {
		err := in.readData(r, w, parts)
		if err != nil {
			in.err = fmt.Errorf("guestmem: ReceiveMigration: %w: %w", ErrPostCopyLost, err)
			close(in.failed)
			od.fail(fmt.Errorf("%w: %w", ErrRestoreFailed, in.err))
		}
	}()
	return od, nil
}
