package guestmem

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/gmem-vmm/gmem/arena"
)

// SnapshotInfo describes a snapshot stream. For a stream holding a chain (a
// snapshot followed by the increments appended to it), ID is the last
// snapshot's (the base an increment on the chain names), Base and
// Incremental the first one's, Layout the chain's, and the counts are the
// sums over Parts.
type SnapshotInfo struct {
	ID          [16]byte
	Base        [16]byte // the snapshot an incremental one applies on
	Incremental bool
	Layout      Layout
	Records     uint64 // data and zero records
	DataBytes   uint64 // guest bytes held as data
	ZeroBytes   uint64 // guest bytes recorded as zero
	Bytes       int64  // length of the stream
	// Parts describes each snapshot of the stream in order, the first at
	// byte 0 and each later one right after its predecessor's end block
	// (Verify only; the Parts of a part are nil).
	Parts []SnapshotInfo
}

// WithLayout makes Restore and RestoreLazy check that the snapshot's layout
// is l (in any order): the guest the VMM is about to run expects that memory
// map, and a snapshot of another is ErrSnapshotLayout. New ignores it.
func WithLayout(l Layout) Option { return func(c *config) { c.expect = slices.Clone(l) } }

// expectLayout checks the snapshot's layout against WithLayout's.
func (c *config) expectLayout(sr *snapReader) error {
	if c.expect == nil {
		return nil
	}
	want := slices.Clone(c.expect)
	slices.SortFunc(want, func(x, y RegionSpec) int { return cmpAddr(x.GPA, y.GPA) })
	if !slices.Equal(want, sr.info.Layout) {
		return sr.fail(sr.start, fmt.Errorf("%w: the snapshot has %v, the caller expects %v", ErrSnapshotLayout,
			sr.info.Layout, want))
	}
	return nil
}

// chainCheck checks stream i of a chain against the one before it.
func chainCheck(i int, prev *SnapshotInfo, cur *snapReader) error {
	switch {
	case i == 0 && cur.info.Incremental:
		return cur.fail(cur.start, fmt.Errorf("%w: the first snapshot is incremental; restore its base first", ErrSnapshotChain))
	case i > 0 && !cur.info.Incremental:
		return cur.fail(cur.start, fmt.Errorf("%w: snapshot %d is a full snapshot, not an increment", ErrSnapshotChain, i))
	case i > 0 && cur.info.Base != prev.ID:
		return cur.fail(cur.start, fmt.Errorf("%w: snapshot %d was taken on base %x, not on %x", ErrSnapshotChain, i,
			cur.info.Base[:4], prev.ID[:4]))
	case i > 0 && !slices.Equal(cur.info.Layout, prev.Layout):
		return cur.fail(cur.start, fmt.Errorf("%w: snapshot %d's layout differs from its base's", ErrSnapshotLayout, i))
	}
	return nil
}

// Restore builds new guest memory from a snapshot and the increments taken
// on it, in order, eagerly: every saved page is read into memory and checked
// against its checksum. Each stream may hold one snapshot or several (a
// snapshot followed by increments that later Saves appended to the same
// writer); the chain runs on across the streams, and every snapshot in it is
// applied. opts choose the backing (and the rest) as for New; the layout
// comes from the snapshot. A malformed, truncated, corrupt or unknown-version
// stream, bytes after an end block that are not a further snapshot, a
// record outside the layout, or an increment that does not follow its
// predecessor is a *SnapshotError, and then no Memory is returned: nothing
// half-restored escapes. The readers are only read.
func Restore(ctx context.Context, streams []io.Reader, opts ...Option) (*Memory, error) {
	if len(streams) == 0 {
		return nil, fmt.Errorf("guestmem: Restore: no snapshot: %w", ErrBadOption)
	}
	c := newConfig(opts)
	if err := c.check("Restore"); err != nil {
		return nil, err
	}
	var m *Memory
	var prev *SnapshotInfo
	index := 0
	err := func() error {
		for i, r := range streams {
			sr := &snapReader{r: r, stream: i, index: index}
			for {
				more, err := sr.nextPart(c.top)
				if err != nil {
					return err
				}
				if !more {
					break
				}
				if err := chainCheck(sr.index, prev, sr); err != nil {
					return err
				}
				if err := c.expectLayout(sr); err != nil {
					return err
				}
				if m == nil {
					if m, err = newMemory(sr.info.Layout, c); err != nil {
						return err
					}
				}
				if err := m.apply(ctx, sr); err != nil {
					return err
				}
				info := sr.info
				prev = &info
			}
			index = sr.index + 1
		}
		return nil
	}()
	if err != nil {
		err = withOp("Restore", err)
		if m != nil {
			err = errors.Join(err, m.Close())
		}
		return nil, err
	}
	m.snap = snapState{id: prev.ID, layout: prev.Layout}
	return m, nil
}

// apply reads the records of sr into m.
func (m *Memory) apply(ctx context.Context, sr *snapReader) error {
	crcs := make([]uint32, maxEntries)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		entries, err := sr.batch()
		if err != nil || entries == nil {
			return err
		}
		for i, e := range entries {
			crcs[i] = 0
			if e.kind == kindZero {
				if err := m.zero(e.gpa, e.n); err != nil {
					return err
				}
				continue
			}
			if e.kind == kindZstd {
				if crcs[i], err = sr.inflate(e, m.putAt(e.gpa)); err != nil {
					return err
				}
				continue
			}
			h := crc32.New(castagnoli)
			n, err := m.CopyFrom(e.gpa, io.TeeReader(sr.r, h), e.n)
			sr.off += n
			if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
				return sr.fail(sr.off, fmt.Errorf("%w: stream ends inside the data of [%v, +%#x)", ErrSnapshotTruncated,
					e.gpa, e.n))
			}
			if err != nil {
				return err
			}
			crcs[i] = h.Sum32()
		}
		if err := sr.sums(entries, crcs[:len(entries)]); err != nil {
			return err
		}
	}
}

// putAt returns the function that stores a decompressed frame, at offset
// off of the record at a, into m.
func (m *Memory) putAt(a GuestAddress) func(off uint64, p []byte) error {
	return func(off uint64, p []byte) error {
		_, err := m.CopyFrom(a+GuestAddress(off), bytes.NewReader(p), uint64(len(p)))
		return err
	}
}

// zero makes [a, a+n) read as zeros: Discard where it can, else writing.
func (m *Memory) zero(a GuestAddress, n uint64) error {
	if uint64(a)%m.pageSize == 0 && n%m.pageSize == 0 {
		if err := m.Discard(a, n); !errors.Is(err, ErrReadOnly) {
			return err
		}
	}
	buf := make([]byte, min(n, 1<<20))
	for done := uint64(0); done < n; {
		k := min(n-done, uint64(len(buf)))
		if _, err := m.WriteAt(buf[:k], int64(a)+int64(done)); err != nil {
			return err
		}
		done += k
	}
	return nil
}

// Verify reads a snapshot stream to its end, checking its structure and
// every checksum, without building guest memory, and describes it. A stream
// holding a chain (a snapshot followed by increments appended to the same
// writer) is checked whole, each increment against its predecessor; Parts
// then describes each snapshot, and the other fields the chain (see
// SnapshotInfo).
func Verify(ctx context.Context, r io.Reader) (SnapshotInfo, error) {
	sr := &snapReader{r: r}
	var all SnapshotInfo
	crcs := make([]uint32, maxEntries)
	for {
		more, err := sr.nextPart(MaxGuestAddress)
		if err != nil {
			return SnapshotInfo{}, err
		}
		if !more {
			break
		}
		if k := len(all.Parts); k > 0 {
			if err := chainCheck(sr.index, &all.Parts[k-1], sr); err != nil {
				return SnapshotInfo{}, err
			}
		}
		if err := sr.verifyPart(ctx, crcs); err != nil {
			return SnapshotInfo{}, err
		}
		all.Parts = append(all.Parts, sr.info)
	}
	first, last := all.Parts[0], all.Parts[len(all.Parts)-1]
	all.ID, all.Base, all.Incremental, all.Layout = last.ID, first.Base, first.Incremental, last.Layout
	for _, p := range all.Parts {
		all.Records += p.Records
		all.DataBytes += p.DataBytes
		all.ZeroBytes += p.ZeroBytes
		all.Bytes += p.Bytes
	}
	return all, nil
}

// verifyPart checks the batches of the current snapshot through its end block.
func (sr *snapReader) verifyPart(ctx context.Context, crcs []uint32) error {
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		entries, err := sr.batch()
		if err != nil || entries == nil {
			return err
		}
		for i, e := range entries {
			if e.kind == kindZero {
				continue
			}
			if e.kind == kindZstd {
				if crcs[i], err = sr.inflate(e, nil); err != nil {
					return err
				}
				continue
			}
			h := crc32.New(castagnoli)
			k, err := io.CopyN(h, sr.r, int64(e.n))
			sr.off += k
			if errors.Is(err, io.EOF) {
				return sr.fail(sr.off, fmt.Errorf("%w: stream ends inside the data of [%v, +%#x)",
					ErrSnapshotTruncated, e.gpa, e.n))
			}
			if err != nil {
				return err
			}
			crcs[i] = h.Sum32()
		}
		if err := sr.sums(entries, crcs[:len(entries)]); err != nil {
			return err
		}
	}
}

// RestoreLazy builds guest memory from snapshot files (a full snapshot and
// any increments on it, in order) without reading their data: each saved
// run of pages is mapped privately from its file at its guest address, so
// pages load on first touch, by the guest or the host (Firecracker's file
// backend). Everything but the payload checksums is checked first — the
// header, every index and checksum block, the chain and the layout — so a
// bad file gives a *SnapshotError and no Memory; run Verify beforehand to
// check the payloads too. Compressed records (SaveOptions.Compress) cannot
// be mapped: they are read into memory during the call, decompressed and
// checked against their checksums. The files are opened read-only by the
// caller, never written (writes go to private copies), and may be closed
// after the call. The memory is Anonymous where no record maps a file; opts may set
// WithGuardGap, WithMaxAddress, WithoutHugepages and WithName.
func RestoreLazy(ctx context.Context, files []*os.File, opts ...Option) (*Memory, error) {
	if len(files) == 0 {
		return nil, fmt.Errorf("guestmem: RestoreLazy: no snapshot: %w", ErrBadOption)
	}
	c := newConfig(opts)
	if err := c.check("RestoreLazy"); err != nil {
		return nil, err
	}
	if c.backing == GuestMemfd {
		return nil, fmt.Errorf("guestmem: RestoreLazy: %w: %w: lazily restored memory maps the snapshot files "+
			"privately, and guest_memfd memory is KVM's own file; use Restore", ErrBadOption, ErrGuestMemfdLimit)
	}
	if c.backing != Anonymous || c.hotplug != 0 {
		return nil, fmt.Errorf("guestmem: RestoreLazy: %w: lazily restored memory is anonymous with file-backed "+
			"pages; backing and hotplug options do not apply", ErrBadOption)
	}
	type plan struct {
		f       *os.File
		stream  int
		entries []entry
	}
	var plans []plan
	var prev *SnapshotInfo
	mappings, index := 0, 0
	for i, f := range files {
		st, err := f.Stat()
		if err != nil {
			return nil, withOp("RestoreLazy", err)
		}
		sr := &snapReader{r: io.NewSectionReader(f, 0, st.Size()), stream: i, index: index}
		var all []entry
		for err == nil {
			var more bool
			if more, err = sr.nextPart(c.top); err != nil || !more {
				break
			}
			if err = chainCheck(sr.index, prev, sr); err == nil {
				err = c.expectLayout(sr)
			}
			if err == nil {
				err = sr.index1(ctx, func(entries []entry) { all = coalesce(all, entries) })
			}
			if err == nil && sr.off > st.Size() {
				err = sr.fail(st.Size(), fmt.Errorf("%w: file has %d bytes", ErrSnapshotTruncated, st.Size()))
			}
			info := sr.info
			prev = &info
		}
		if err != nil {
			return nil, withOp("RestoreLazy", err)
		}
		index = sr.index + 1
		mappings += len(all)
		plans = append(plans, plan{f: f, stream: i, entries: all})
	}
	if limit := maxMapCount(); mappings > limit/2 {
		return nil, fmt.Errorf("guestmem: RestoreLazy: %w: the snapshots hold %d records, each a memory area, and "+
			"vm.max_map_count is %d: restore eagerly, or raise the limit", ErrBacking, mappings, limit)
	}
	m, err := newMemory(prev.Layout, c)
	if err != nil {
		return nil, withOp("RestoreLazy", err)
	}
	m.overlay = true
	t := m.tab.Load()
	for _, p := range plans {
		for _, e := range p.entries {
			pieces, err := t.resolve("RestoreLazy", e.gpa, e.n)
			at := e.at
			for _, pc := range pieces {
				if err != nil {
					break
				}
				if e.kind == kindData {
					err = pc.a.AddFDMapping(pc.off, pc.n, int(p.f.Fd()), at, arena.ProtReadWrite, arena.Private(),
						arena.NoReserve(), arena.Replace())
				} else {
					err = pc.a.AddAnonMapping(pc.off, pc.n, arena.ProtReadWrite, arena.Private(), arena.NoReserve(),
						arena.Replace())
				}
				if err == nil {
					err = m.applyDefaults(pc.a, pc.off, pc.n)
				}
				err = pc.inGuestTerms("RestoreLazy", err)
				at += pc.n
			}
			if err == nil && e.kind == kindZstd {
				err = inflateAt(m, p.f, p.stream, e)
			}
			if err != nil {
				return nil, errors.Join(withOp("RestoreLazy", err), m.Close())
			}
		}
	}
	m.snap = snapState{id: prev.ID, layout: prev.Layout}
	return m, nil
}

// index1 reads the batches of the current snapshot through its end block,
// skipping the payloads, and hands each batch's records (with their
// checksums, and part set) to fn.
func (sr *snapReader) index1(ctx context.Context, fn func([]entry)) error {
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		entries, err := sr.batch()
		if err != nil || entries == nil {
			return err
		}
		var data int64
		for j, e := range entries {
			switch e.kind {
			case kindData:
				data += int64(e.n)
			case kindZstd:
				data += e.plen
			}
			entries[j].part = sr.index
		}
		if err := sr.skip(data); err != nil {
			return err
		}
		if err := sr.sums(entries, nil); err != nil {
			return err
		}
		fn(entries)
	}
}

// coalesce appends entries to all, merging a data record into the one
// before it where both their guest addresses and their payloads are
// contiguous (the records of a batch, which Save cuts at every 256 KiB of
// guest address): RestoreLazy then maps the run with one mapping.
func coalesce(all, entries []entry) []entry {
	for _, e := range entries {
		if k := len(all); k > 0 && e.kind == kindData {
			last := &all[k-1]
			if last.kind == kindData && last.part == e.part && last.gpa+GuestAddress(last.n) == e.gpa &&
				last.at+int64(last.n) == e.at {
				last.n += e.n
				continue
			}
		}
		all = append(all, e)
	}
	return all
}

// inflateAt reads the compressed record e of file f (stream number stream)
// into m, whose range for it is anonymous memory, and checks its checksum.
func inflateAt(m *Memory, f *os.File, stream int, e entry) error {
	sr := &snapReader{r: io.NewSectionReader(f, e.at, e.plen), stream: stream, index: e.part, off: e.at}
	crc, err := sr.inflate(e, m.putAt(e.gpa))
	if err == nil && crc != e.crc {
		err = sr.fail(e.at, fmt.Errorf("%w: data of [%v, +%#x): crc %#x, stored %#x", ErrSnapshotChecksum, e.gpa, e.n,
			crc, e.crc))
	}
	return err
}

// maxMapCount reads vm.max_map_count (65530 if unreadable).
func maxMapCount() int {
	b, err := os.ReadFile("/proc/sys/vm/max_map_count")
	if err != nil {
		return 65530
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 65530
	}
	return n
}

// RestoreFile is Restore of the one snapshot file at path, which may hold a
// chain (a snapshot and the increments appended to it).
func RestoreFile(ctx context.Context, path string, opts ...Option) (*Memory, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("guestmem: RestoreFile: %w", err)
	}
	defer f.Close()
	return Restore(ctx, []io.Reader{bufio.NewReaderSize(f, 1<<20)}, opts...)
}

// RestoreLazyFile is RestoreLazy of the one snapshot file at path, which
// may hold a chain. The file may be removed afterwards: the mappings keep
// it alive.
func RestoreLazyFile(ctx context.Context, path string, opts ...Option) (*Memory, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("guestmem: RestoreLazyFile: %w", err)
	}
	defer f.Close()
	return RestoreLazy(ctx, []*os.File{f}, opts...)
}
