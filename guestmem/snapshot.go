package guestmem

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/internal/fault"
	"github.com/gmem-vmm/gmem/internal/procfs"
)

// SaveOptions tunes Save.
type SaveOptions struct {
	// Incremental writes only the pages dirtied since the previous Save
	// (data, or a zero record where a page became zero). It needs dirty
	// tracking on continuously since that Save, and the same layout.
	Incremental bool
	// Compress writes the data zstd-compressed in 64 KiB frames, as a
	// version 2 stream (docs/guestmem.md): smaller, and slower to write.
	// Every reader reads both versions; RestoreLazy reads compressed
	// records into memory rather than mapping them.
	Compress bool
}

// SaveStats describes a finished Save.
type SaveStats struct {
	ID          [16]byte // the snapshot's identity; an incremental one names it as its base
	Incremental bool
	Bytes       int64         // bytes written to the stream
	DataBytes   uint64        // guest bytes saved as data
	ZeroBytes   uint64        // guest bytes saved as zero records (incremental)
	Records     uint64        // data and zero records
	Duration    time.Duration // wall time of Save
}

// Save streams guest memory to w in the snapshot format (docs/guestmem.md):
// the layout, then only populated, non-zero data — holes are skipped with
// SEEK_DATA/SEEK_HOLE on memfd backings and pagemap on anonymous memory
// (pages in swap included), and
// all-zero pages are not written — in checksummed batches. With
// o.Incremental it writes only pages dirtied since the previous Save. The
// vCPUs must be paused (kvm.VM.Pause: no guest writes) while it runs; a full Save with
// dirty tracking on resets the dirty set, starting the next increment. A
// Save that fails (the writer's error, a cancelled ctx) leaves the dirty set
// as it found it: the previous snapshot stays the base of the next
// increment, which still holds every page written since. w runs holding the
// memory: it may read guest memory and call FD, Tracking and VM, but what
// would wait for Save (CollectDirty, Save, Close, hotplug, registration,
// tracking changes) returns ErrReentered.
func (m *Memory) Save(ctx context.Context, w io.Writer, o SaveOptions) (SaveStats, error) {
	start := time.Now()
	if od := m.restoring(); od != nil {
		// Pages still missing would be skipped as holes, and the snapshot
		// silently incomplete: fill them first, and wait for the
		// userfaultfd to go, so the scan below touches no userfault.
		if err := m.inSave.Check("Save"); err != nil {
			return SaveStats{}, fmt.Errorf("guestmem: %w", err)
		}
		if err := od.Fill(ctx); err != nil {
			return SaveStats{}, withOp("Save", err)
		}
		if err := od.Wait(ctx); err != nil {
			return SaveStats{}, withOp("Save", err)
		}
	}
	if err := m.lock("Save", false); err != nil {
		return SaveStats{}, err
	}
	defer m.wmu.Unlock()
	// The writer runs with wmu and the table held: what it calls that would
	// wait for either fails with ErrReentered (see lock).
	m.inSave.Enter("Save")
	defer m.inSave.Leave()
	m.inCallback.Enter("Save")
	defer m.inCallback.Leave()
	t, err := m.acquire("Save")
	if err != nil {
		return SaveStats{}, err
	}
	defer t.release()
	h := snapHeader{}
	if o.Compress {
		h.version = SnapshotVersionCompressed
	}
	for _, r := range t.regions {
		h.regions = append(h.regions, RegionSpec{GPA: r.GPA, Size: r.Size, ReadOnly: r.ReadOnly})
	}
	if _, err := rand.Read(h.id[:]); err != nil {
		return SaveStats{}, withOp("Save", err)
	}
	// dirty is what this Save takes out of the dirty set: the pages an
	// increment writes, or (a full Save) the pages the next increment need
	// no longer write. A failed Save puts it back, so the dirty state is as
	// if it had not been tried and the last good snapshot stays a base.
	var dirty *DirtySet
	if o.Incremental {
		switch {
		case m.gmem != nil && m.reg != nil:
			return SaveStats{}, fmt.Errorf("guestmem: Save: %w: %w: the memory is registered, and KVM keeps no "+
				"dirty log of guest_memfd slots, so what the guest wrote since the last Save is unknown",
				ErrNeedFullSave, ErrGuestMemfdLimit)
		case m.snap.id == [16]byte{}:
			return SaveStats{}, fmt.Errorf("guestmem: Save: %w: no earlier Save", ErrNeedFullSave)
		case !m.tracking || !m.snap.tracked:
			return SaveStats{}, fmt.Errorf("guestmem: Save: %w: dirty tracking was not on since the last Save",
				ErrNeedFullSave)
		case !slices.Equal(m.snap.layout, h.regions):
			return SaveStats{}, fmt.Errorf("guestmem: Save: %w: the layout changed since the last Save", ErrNeedFullSave)
		}
		h.flags, h.base = flagIncrement, m.snap.id
		if dirty, err = m.collectLocked("Save", true); err != nil {
			return SaveStats{}, err
		}
	} else if m.tracking {
		if dirty, err = m.collectLocked("Save", false); err != nil { // this Save starts the next increment
			return SaveStats{}, err
		}
	}
	sw := &snapWriter{w: w, m: m, t: t, ctx: ctx, stats: SaveStats{ID: h.id, Incremental: o.Incremental},
		sums: startChecksummer(), compress: o.Compress}
	defer sw.sums.stop()
	err = sw.write(h.marshal())
	if err == nil {
		if o.Incremental {
			err = sw.saveDirty(dirty)
		} else {
			err = sw.saveFull()
		}
	}
	if err == nil {
		err = sw.flush()
	}
	if err == nil {
		err = sw.end()
	}
	if err != nil {
		if dirty != nil {
			t.remark(dirty)
		}
		return sw.stats, withOp("Save", err)
	}
	m.snap = snapState{id: h.id, layout: h.regions, tracked: m.tracking}
	sw.stats.Duration = time.Since(start)
	return sw.stats, nil
}

// snapState remembers the last Save (or Restore) for incremental saves.
type snapState struct {
	id      [16]byte
	layout  Layout
	tracked bool // dirty tracking was on at that point
}

type snapWriter struct {
	w       io.Writer
	m       *Memory
	t       *table
	ctx     context.Context
	stats   SaveStats
	pending []entry
	data    uint64 // payload bytes pending
	batches uint64
	sums    *checksummer
	// compress writes data records as compressed ones.
	compress bool
	// live copies each data record into buf before checksumming and
	// writing it: the guest may be writing the memory meanwhile (a
	// migration round), and the checksum must be of the bytes sent.
	live bool
	buf  []byte
}

// recordUnit bounds data records: Save never lets one cross a multiple of
// it in guest-physical address space, so a record is at most 256 KiB and
// lies in one aligned 256 KiB block. RestoreOnDemand then fetches and
// checks at most that much to serve a fault (a record's checksum covers the
// whole record), and a compressed batch's payloads, held in memory until
// its index block is written, stay bounded (127 × 256 KiB).
const recordUnit = 256 << 10

func (sw *snapWriter) write(b []byte) error {
	n, err := sw.w.Write(b)
	sw.stats.Bytes += int64(n)
	if err == nil && n < len(b) {
		err = io.ErrShortWrite
	}
	return err
}

// add queues a record, merging it with the previous one where they touch.
// It never writes: the scan that calls it runs inside an arena access.
func (sw *snapWriter) add(e entry) error {
	if e.kind == kindData {
		sw.data += e.n
	}
	if k := len(sw.pending); k > 0 {
		last := &sw.pending[k-1]
		if last.kind == e.kind && last.gpa+GuestAddress(last.n) == e.gpa && sw.t.sameRegion(last.gpa, e.gpa) &&
			!(e.kind == kindData && uint64(e.gpa)%recordUnit == 0) {
			last.n += e.n
			return nil
		}
	}
	sw.pending = append(sw.pending, e)
	return nil
}

// scanWindow bounds how much is scanned before the records found are
// written, so the payload is still warm when it is.
const scanWindow = 64 << 20

func (sw *snapWriter) maybeFlush() error {
	if len(sw.pending) >= maxEntries || sw.data >= scanWindow {
		return sw.flush()
	}
	return nil
}

func (t *table) sameRegion(a, b GuestAddress) bool {
	i, ok1 := t.find(a)
	j, ok2 := t.find(b)
	return ok1 && ok2 && i == j
}

// flush writes the pending records, in batches of up to maxEntries.
func (sw *snapWriter) flush() error {
	for len(sw.pending) > 0 {
		k := min(len(sw.pending), maxEntries)
		if err := sw.batch(sw.pending[:k]); err != nil {
			return err
		}
		sw.pending = sw.pending[k:]
	}
	sw.pending, sw.data = nil, 0
	return nil
}

// batch writes one index block, its payloads and its checksum block.
func (sw *snapWriter) batch(pending []entry) error {
	if err := sw.ctx.Err(); err != nil {
		return err
	}
	if sw.compress {
		return sw.compressedBatch(pending)
	}
	if err := sw.write(indexBlock(pending, sw.batches)); err != nil {
		return err
	}
	crcs := make([]uint32, len(pending))
	for i, e := range pending {
		sw.stats.Records++
		if e.kind != kindData {
			sw.stats.ZeroBytes += e.n
			continue
		}
		if sw.live {
			if uint64(cap(sw.buf)) < e.n {
				sw.buf = make([]byte, e.n)
			}
			b := sw.buf[:0]
			if _, err := sw.t.copyTo("Migrate", (*appender)(&b), e.gpa, e.n); err != nil {
				return err
			}
			crcs[i] = crc32.Checksum(b, castagnoli)
			if err := sw.write(b); err != nil {
				return err
			}
			sw.stats.DataBytes += e.n
			continue
		}
		cw := &crcWriter{w: sw}
		if _, err := sw.t.copyTo("Save", cw, e.gpa, e.n); err != nil {
			return err
		}
		crcs[i] = cw.crc
		sw.stats.DataBytes += e.n
	}
	if err := sw.write(sumBlock(crcs, sw.batches)); err != nil {
		return err
	}
	sw.batches++
	return nil
}

// compressedBatch writes a batch whose data records are compressed: their
// payloads are built first, since the index block gives their lengths.
func (sw *snapWriter) compressedBatch(pending []entry) error {
	crcs := make([]uint32, len(pending))
	payloads := make([][]byte, len(pending))
	for i := range pending {
		e := &pending[i]
		if e.kind != kindData {
			continue
		}
		z := newZstdWriter(e.n)
		if _, err := sw.t.copyTo("Save", z, e.gpa, e.n); err != nil {
			return err
		}
		e.kind, payloads[i], crcs[i] = kindZstd, z.finish(), z.crc
		e.plen = int64(len(payloads[i]))
	}
	if err := sw.write(indexBlock(pending, sw.batches)); err != nil {
		return err
	}
	for i, e := range pending {
		sw.stats.Records++
		if e.kind == kindZero {
			sw.stats.ZeroBytes += e.n
			continue
		}
		if err := sw.write(payloads[i]); err != nil {
			return err
		}
		sw.stats.DataBytes += e.n
	}
	if err := sw.write(sumBlock(crcs, sw.batches)); err != nil {
		return err
	}
	sw.batches++
	return nil
}

// appender is an io.Writer appending to a byte slice.
type appender []byte

func (a *appender) Write(p []byte) (int, error) {
	*a = append(*a, p...)
	return len(p), nil
}

func (sw *snapWriter) end() error {
	return sw.write(endBlock(sw.batches, sw.stats.Records, sw.stats.DataBytes))
}

// crcWriter writes a payload in pieces while a second goroutine checksums
// each piece as it is written: the two passes over the data run on two CPUs
// at once, and the piece is small enough that the second read comes from
// cache.
type crcWriter struct {
	w   *snapWriter
	crc uint32
}

const crcPiece = 256 << 10

// crcJob asks the checksum goroutine to extend crc over p.
type crcJob struct {
	crc uint32
	p   []byte
}

// crcResult is the extended checksum, or the address of a memory fault.
type crcResult struct {
	crc     uint32
	fault   uintptr
	faulted bool
}

// checksummer runs for the duration of a Save; jobs are answered in order.
type checksummer struct {
	jobs    chan crcJob
	results chan crcResult
}

func startChecksummer() *checksummer {
	c := &checksummer{jobs: make(chan crcJob), results: make(chan crcResult, 1)}
	go func() {
		for j := range c.jobs {
			c.results <- checksum(j)
		}
	}()
	return c
}

func (c *checksummer) stop() { close(c.jobs) }

// checksum reads guest memory: a fault (a truncated backing file) comes
// back as a result, not a crash.
func checksum(j crcJob) (r crcResult) {
	r.fault, r.faulted = fault.Catch(func() { r.crc = crc32.Update(j.crc, castagnoli, j.p) })
	return r
}

func (c *crcWriter) Write(b []byte) (n int, err error) {
	cs := c.w.sums
	for n < len(b) {
		p := b[n:min(len(b), n+crcPiece)]
		cs.jobs <- crcJob{crc: c.crc, p: p}
		// Wait for the checksum before returning, also when writing p
		// faults and unwinds this call: p must not be read after it.
		werr := func() error {
			defer func() {
				r := <-cs.results
				if r.faulted {
					err = &arena.FaultError{Op: "Save", Addr: r.fault, Err: arena.ErrFault}
				}
				c.crc = r.crc
			}()
			return c.w.write(p)
		}()
		if err != nil {
			return n, err
		}
		if werr != nil {
			return n, werr
		}
		n += len(p)
	}
	return n, nil
}

var zeroPage [dirtyPage]byte

// scanner classifies pages as zero or data while the arena hands it the
// range (fault-protected, zero-copy), and emits records.
type scanner struct {
	sw        *snapWriter
	pos       GuestAddress // guest address of the next byte
	keepZeros bool         // emit zero records (incremental) rather than skip
	run       entry        // the run being built; n == 0 when none
	err       error
}

func (s *scanner) Write(b []byte) (int, error) {
	for i := 0; i < len(b); i += dirtyPage {
		if i%(1<<20) == 0 {
			if err := s.sw.ctx.Err(); err != nil {
				return i, err
			}
		}
		p := b[i:min(len(b), i+dirtyPage)]
		kind := uint32(kindData)
		if p[0] == 0 && bytes.Equal(p, zeroPage[:len(p)]) {
			kind = kindZero
		}
		s.page(kind, uint64(len(p)))
		if s.err != nil {
			return i, s.err
		}
	}
	return len(b), nil
}

func (s *scanner) page(kind uint32, n uint64) {
	if kind == kindZero && !s.keepZeros {
		s.close()
		s.pos += GuestAddress(n)
		return
	}
	if s.run.n > 0 && (s.run.kind != kind || kind == kindData && uint64(s.pos)%recordUnit == 0) {
		s.close()
	}
	if s.run.n == 0 {
		s.run = entry{gpa: s.pos, kind: kind}
	}
	s.run.n += n
	s.pos += GuestAddress(n)
}

func (s *scanner) close() {
	if s.run.n > 0 && s.err == nil {
		s.err = s.sw.add(s.run)
	}
	s.run = entry{}
}

// scan classifies [a, a+n), which lies in one region, a window at a time,
// writing the records found between windows.
func (sw *snapWriter) scan(a GuestAddress, n uint64, keepZeros bool) error {
	s := &scanner{sw: sw, pos: a, keepZeros: keepZeros}
	for done := uint64(0); done < n; {
		k := min(n-done, scanWindow)
		if _, err := sw.t.copyTo("Save", s, a+GuestAddress(done), k); err != nil {
			return err
		}
		done += k
		if done < n && (len(sw.pending) >= maxEntries || sw.data >= scanWindow) {
			s.close() // a run may continue into the next window: cut it here
			if err := sw.flush(); err != nil {
				return err
			}
		}
	}
	s.close()
	return errors.Join(s.err, sw.maybeFlush())
}

func (sw *snapWriter) saveDirty(d *DirtySet) error {
	for s := range d.Ranges() {
		if err := sw.scan(s.GPA, s.Size, true); err != nil {
			return err
		}
	}
	return nil
}

// saveFull scans the populated parts of every region.
func (sw *snapWriter) saveFull() error {
	m := sw.m
	for _, r := range sw.t.regions {
		extents, err := m.populated(r)
		if err != nil {
			return err
		}
		for _, e := range extents {
			if err := sw.scan(r.GPA+GuestAddress(e.off), uint64(e.n), false); err != nil {
				return err
			}
		}
	}
	return nil
}

// populatedRuns appends to out the runs of pages that hold data (in RAM or
// in swap) among entries, the pagemap entries of the pages of ps bytes from
// offset off, merging a run with the last one where they touch.
func populatedRuns(entries []uint64, off, ps int64, out []fdRange) []fdRange {
	for i := 0; i < len(entries); {
		if !procfs.Populated(entries[i]) {
			i++
			continue
		}
		j := i + 1
		for j < len(entries) && procfs.Populated(entries[j]) {
			j++
		}
		p := off + int64(i)*ps
		if k := len(out); k > 0 && out[k-1].off+out[k-1].n == p {
			out[k-1].n += int64(j-i) * ps
		} else {
			out = append(out, fdRange{off: p, n: int64(j-i) * ps})
		}
		i = j
	}
	return out
}

// populated returns the parts of r (offsets within it) that may hold data:
// SEEK_DATA/SEEK_HOLE on a memfd (shmem counts swapped pages as data),
// pagemap's present and swapped bits on anonymous memory, and all of
// it for private file mappings (whose unread pages are data in the file).
func (m *Memory) populated(r region) ([]fdRange, error) {
	switch {
	case m.backing == Memfd || m.backing == Hugetlb:
		var out []fdRange
		end := r.FDOffset + int64(r.Size)
		for pos := r.FDOffset; pos < end; {
			d, err := unix.Seek(m.fd, pos, unix.SEEK_DATA)
			if errors.Is(err, unix.ENXIO) || err == nil && d >= end {
				break
			}
			if err != nil {
				return nil, os.NewSyscallError("lseek(SEEK_DATA)", err)
			}
			h, err := unix.Seek(m.fd, d, unix.SEEK_HOLE)
			if err != nil {
				return nil, os.NewSyscallError("lseek(SEEK_HOLE)", err)
			}
			h = min(h, end)
			out = append(out, fdRange{off: d - r.FDOffset, n: h - d})
			pos = h
		}
		return out, nil
	case m.backing == GuestMemfd:
		// mincore: it looks the pages up in the guest_memfd's page cache,
		// so it sees pages only the guest touched; guest_memfd has no
		// SEEK_DATA and never swaps.
		res, err := r.host.Resident(r.arenaOff, int64(r.Size))
		if err != nil {
			return nil, err
		}
		ps := int64(os.Getpagesize())
		var out []fdRange
		for i := 0; i < len(res); {
			if !res[i] {
				i++
				continue
			}
			j := i + 1
			for j < len(res) && res[j] {
				j++
			}
			out = append(out, fdRange{off: int64(i) * ps, n: int64(j-i) * ps})
			i = j
		}
		return out, nil
	case m.backing == Anonymous && !m.overlay:
		// pagemap, not mincore: mincore does not report pages in swap, and
		// a scan built on it would save swapped-out guest pages as zeros.
		pm, err := procfs.OpenPagemap()
		if err != nil {
			return nil, err
		}
		defer pm.Close()
		const window = 64 << 10 // pages per read: 512 KiB of entries
		ps := int64(os.Getpagesize())
		entries := make([]uint64, min(window, int64(r.Size)/ps))
		var out []fdRange
		for off := int64(0); off < int64(r.Size); off += int64(len(entries)) * ps {
			e := entries[:min(int64(len(entries)), (int64(r.Size)-off)/ps)]
			if err := pm.Read(r.HostAddr+uintptr(off), int(ps), e); err != nil {
				return nil, err
			}
			out = populatedRuns(e, off, ps, out)
		}
		return out, nil
	}
	return []fdRange{{off: 0, n: int64(r.Size)}}, nil
}
