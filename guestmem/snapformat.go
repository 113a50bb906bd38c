package guestmem

// The snapshot stream format (docs/guestmem.md, "Snapshot stream format"):
// its constants, its blocks' encoders, and its reader. Save writes with
// the encoders; Restore, RestoreLazy and Verify read with snapReader.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"slices"
)

// SnapshotVersion is the version of the snapshot format Save writes without
// compression. docs/guestmem.md specifies it.
const SnapshotVersion = 1

// SnapshotVersionCompressed is the version Save writes with
// SaveOptions.Compress: version 1 plus compressed data records
// (docs/guestmem.md, "Snapshot stream format, version 2"). Restore,
// RestoreLazy and Verify read both.
const SnapshotVersionCompressed = 2

// Snapshot errors. Every error from Restore, RestoreLazy and Verify about
// the stream itself is a *SnapshotError wrapping one of them.
var (
	// ErrSnapshotFormat: not a snapshot, or a block is malformed.
	ErrSnapshotFormat = errors.New("malformed snapshot")
	// ErrSnapshotVersion: a version this package does not read.
	ErrSnapshotVersion = errors.New("unknown snapshot version")
	// ErrSnapshotChecksum: a block or payload does not match its checksum.
	ErrSnapshotChecksum = errors.New("snapshot checksum mismatch")
	// ErrSnapshotTruncated: the stream ends before its end block.
	ErrSnapshotTruncated = errors.New("snapshot truncated")
	// ErrSnapshotLayout: a record lies outside the snapshot's layout, or an
	// incremental snapshot's layout differs from its base's.
	ErrSnapshotLayout = errors.New("snapshot layout mismatch")
	// ErrSnapshotChain: the first snapshot is incremental, a later one is not,
	// or an incremental one was taken on another base.
	ErrSnapshotChain = errors.New("snapshot chain broken")
	// ErrNeedFullSave: an incremental Save is impossible — no earlier Save,
	// dirty tracking was not on continuously since it, or the layout changed
	// (hotplug) since.
	ErrNeedFullSave = errors.New("incremental save needs a full save first")
)

// SnapshotError reports a problem with a snapshot stream.
type SnapshotError struct {
	Op     string // Restore, RestoreLazy or Verify
	Stream int    // which reader (or file) of the call, from 0
	Index  int    // which snapshot of the chain (0: the base), counted across streams
	Offset int64  // byte offset in that stream of the block at fault
	Err    error  // a sentinel, possibly wrapping detail
}

func (e *SnapshotError) Error() string {
	op := e.Op
	if op == "" {
		op = "Verify"
	}
	return fmt.Sprintf("guestmem: %s: snapshot %d (stream %d) at byte %d: %v", op, e.Index, e.Stream, e.Offset, e.Err)
}

// Unwrap returns the cause.
func (e *SnapshotError) Unwrap() error { return e.Err }

const (
	blockSize      = 4096
	headerFixed    = 64
	regionRecord   = 32
	maxSnapRegions = 1 << 16
	entrySize      = 32
	maxEntries     = (blockSize - 32) / entrySize // 127 per index block
	kindData       = 1
	kindZero       = 2
	kindZstd       = 3 // compressed data, version 2 only
	flagIncrement  = 1
	regionReadOnly = 1
	snapMagic      = "GMEMSNAP"
	indexMagic     = "GMEMIDX\x00"
	sumMagic       = "GMEMSUM\x00"
	endMagic       = "GMEMEND\x00"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// blockCRC is the CRC-32C of b with its 4 bytes at off taken as zero.
func blockCRC(b []byte, off int) uint32 {
	c := crc32.Update(0, castagnoli, b[:off])
	c = crc32.Update(c, castagnoli, []byte{0, 0, 0, 0})
	return crc32.Update(c, castagnoli, b[off+4:])
}

type snapHeader struct {
	version uint32 // 0: SnapshotVersion
	flags   uint32
	regions Layout
	id      [16]byte
	base    [16]byte
}

func (h *snapHeader) size() int {
	return int(alignUp(uint64(headerFixed+len(h.regions)*regionRecord), blockSize))
}

func (h *snapHeader) marshal() []byte {
	b := make([]byte, h.size())
	copy(b, snapMagic)
	le := binary.LittleEndian
	v := h.version
	if v == 0 {
		v = SnapshotVersion
	}
	le.PutUint32(b[8:], v)
	le.PutUint32(b[12:], h.flags)
	le.PutUint32(b[16:], dirtyPage)
	le.PutUint32(b[20:], uint32(len(h.regions)))
	le.PutUint32(b[24:], uint32(len(b)))
	copy(b[32:], h.id[:])
	copy(b[48:], h.base[:])
	for i, r := range h.regions {
		o := headerFixed + i*regionRecord
		le.PutUint64(b[o:], uint64(r.GPA))
		le.PutUint64(b[o+8:], r.Size)
		if r.ReadOnly {
			le.PutUint64(b[o+16:], regionReadOnly)
		}
	}
	le.PutUint32(b[28:], blockCRC(b, 28))
	return b
}

// entry is one record of an index block.
type entry struct {
	gpa  GuestAddress
	n    uint64
	kind uint32
	at   int64  // stream offset of the payload (data records)
	plen int64  // payload length of a compressed record (index offset 24)
	crc  uint32 // the checksum block's, once read
	part int    // which snapshot of the chain (RestoreLazy)
}

// indexBlock encodes the index block of batch number batch.
func indexBlock(pending []entry, batch uint64) []byte {
	le := binary.LittleEndian
	b := make([]byte, blockSize)
	copy(b, indexMagic)
	le.PutUint32(b[8:], uint32(len(pending)))
	le.PutUint64(b[16:], batch)
	for i, e := range pending {
		o := 32 + i*entrySize
		le.PutUint64(b[o:], uint64(e.gpa))
		le.PutUint64(b[o+8:], e.n)
		le.PutUint32(b[o+16:], e.kind)
		if e.kind == kindZstd {
			le.PutUint64(b[o+24:], uint64(e.plen))
		}
	}
	le.PutUint32(b[12:], blockCRC(b, 12))
	return b
}

// sumBlock encodes the checksum block of batch number batch: the CRC-32C
// of each record's payload (0 for zero records).
func sumBlock(crcs []uint32, batch uint64) []byte {
	le := binary.LittleEndian
	b := make([]byte, blockSize)
	copy(b, sumMagic)
	le.PutUint32(b[8:], uint32(len(crcs)))
	le.PutUint64(b[16:], batch)
	for i, c := range crcs {
		le.PutUint32(b[32+i*4:], c)
	}
	le.PutUint32(b[12:], blockCRC(b, 12))
	return b
}

// endBlock encodes the end block.
func endBlock(batches, records, dataBytes uint64) []byte {
	le := binary.LittleEndian
	b := make([]byte, blockSize)
	copy(b, endMagic)
	le.PutUint64(b[16:], batches)
	le.PutUint64(b[24:], records)
	le.PutUint64(b[32:], dataBytes)
	le.PutUint32(b[12:], blockCRC(b, 12))
	return b
}

// snapReader parses a snapshot stream: one snapshot, or a chain of them (a
// snapshot followed by increments appended to the same writer). The per-
// snapshot fields are reset by nextPart; off runs on across the stream.
type snapReader struct {
	r       io.Reader
	stream  int   // which reader of a Restore
	index   int   // position of the current snapshot in the chain
	off     int64 // bytes consumed from the stream
	start   int64 // stream offset of the current snapshot's header
	info    SnapshotInfo
	version uint32 // of the current snapshot
	batches uint64
	next    GuestAddress // records must increase
	block   [blockSize]byte
}

func (sr *snapReader) fail(at int64, err error) error {
	return &SnapshotError{Stream: sr.stream, Index: sr.index, Offset: at, Err: err}
}

// readFull reads exactly len(b) bytes; a short stream is ErrSnapshotTruncated.
func (sr *snapReader) readFull(b []byte) error {
	n, err := io.ReadFull(sr.r, b)
	sr.off += int64(n)
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return sr.fail(sr.off, fmt.Errorf("%w: stream ends after %d bytes", ErrSnapshotTruncated, sr.off))
	}
	return err
}

// skip passes over n payload bytes.
func (sr *snapReader) skip(n int64) error {
	if s, ok := sr.r.(io.Seeker); ok {
		cur, err := s.Seek(n, io.SeekCurrent)
		if err != nil {
			return err
		}
		sr.off = cur
		return nil
	}
	k, err := io.CopyN(io.Discard, sr.r, n)
	sr.off += k
	if errors.Is(err, io.EOF) {
		return sr.fail(sr.off, fmt.Errorf("%w: stream ends after %d bytes", ErrSnapshotTruncated, sr.off))
	}
	return err
}

// nextPart reads the header of the stream's next snapshot. The first call needs
// one (an empty stream is truncated); a later call, made after an end block,
// returns false at the end of the stream, and anything there but another
// snapshot's header — a few stray bytes, or a block of something else — is
// ErrSnapshotFormat: data after an end block is never ignored.
func (sr *snapReader) nextPart(top GuestAddress) (bool, error) {
	b := sr.block[:]
	first := sr.off == 0
	sr.start = sr.off
	if first {
		if err := sr.readFull(b); err != nil {
			return false, err
		}
	} else {
		n, err := io.ReadFull(sr.r, b)
		sr.off += int64(n)
		switch {
		case n == 0 && errors.Is(err, io.EOF):
			return false, nil
		case n < len(b) && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)):
			return false, sr.fail(sr.start, fmt.Errorf("%w: %d stray bytes after the end block", ErrSnapshotFormat, n))
		case err != nil:
			return false, err
		case string(b[:8]) != snapMagic:
			return false, sr.fail(sr.start, fmt.Errorf("%w: data after the end block is not a snapshot",
				ErrSnapshotFormat))
		}
		sr.index++
	}
	sr.info, sr.batches, sr.next = SnapshotInfo{}, 0, 0
	return true, sr.header(top)
}

// header parses the header whose first block is in sr.block.
func (sr *snapReader) header(top GuestAddress) error {
	b := sr.block[:]
	at := sr.start
	le := binary.LittleEndian
	if string(b[:8]) != snapMagic {
		return sr.fail(at, fmt.Errorf("%w: no snapshot magic", ErrSnapshotFormat))
	}
	sr.version = le.Uint32(b[8:])
	if sr.version != SnapshotVersion && sr.version != SnapshotVersionCompressed {
		return sr.fail(at, fmt.Errorf("%w: version %d, this package reads %d and %d", ErrSnapshotVersion, sr.version,
			SnapshotVersion, SnapshotVersionCompressed))
	}
	flags, page, n, size := le.Uint32(b[12:]), le.Uint32(b[16:]), le.Uint32(b[20:]), le.Uint32(b[24:])
	if flags&^flagIncrement != 0 || page != dirtyPage || n == 0 || n > maxSnapRegions ||
		uint64(size) != alignUp(uint64(headerFixed)+uint64(n)*regionRecord, blockSize) {
		return sr.fail(at, fmt.Errorf("%w: header fields (flags %#x, page %d, %d regions, %d bytes)",
			ErrSnapshotFormat, flags, page, n, size))
	}
	hdr := make([]byte, size)
	copy(hdr, b)
	if err := sr.readFull(hdr[blockSize:]); err != nil {
		return err
	}
	if got, want := blockCRC(hdr, 28), le.Uint32(hdr[28:]); got != want {
		return sr.fail(at, fmt.Errorf("%w: header crc %#x, stored %#x", ErrSnapshotChecksum, got, want))
	}
	sr.info.Incremental = flags&flagIncrement != 0
	copy(sr.info.ID[:], hdr[32:48])
	copy(sr.info.Base[:], hdr[48:64])
	for i := 0; i < int(n); i++ {
		o := headerFixed + i*regionRecord
		fl := le.Uint64(hdr[o+16:])
		if fl&^regionReadOnly != 0 {
			return sr.fail(at, fmt.Errorf("%w: region %d flags %#x", ErrSnapshotFormat, i, fl))
		}
		sr.info.Layout = append(sr.info.Layout, RegionSpec{GPA: GuestAddress(le.Uint64(hdr[o:])),
			Size: le.Uint64(hdr[o+8:]), ReadOnly: fl&regionReadOnly != 0})
	}
	if err := sr.info.Layout.Validate(dirtyPage, top); err != nil {
		return sr.fail(at, fmt.Errorf("%w: %w", ErrSnapshotLayout, err))
	}
	// Sorted once here, so every record's check is a walk, not a sort.
	slices.SortFunc(sr.info.Layout, func(x, y RegionSpec) int { return cmpAddr(x.GPA, y.GPA) })
	return nil
}

// batch reads the next index block. It returns nil entries at the end block.
func (sr *snapReader) batch() ([]entry, error) {
	at := sr.off
	b := sr.block[:]
	if err := sr.readFull(b); err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	switch string(b[:8]) {
	case endMagic:
		if got, want := blockCRC(b, 12), le.Uint32(b[12:]); got != want {
			return nil, sr.fail(at, fmt.Errorf("%w: end block crc %#x, stored %#x", ErrSnapshotChecksum, got, want))
		}
		if le.Uint64(b[16:]) != sr.batches || le.Uint64(b[24:]) != sr.info.Records || le.Uint64(b[32:]) != sr.info.DataBytes {
			return nil, sr.fail(at, fmt.Errorf("%w: end block counts (%d batches, %d records, %d data bytes) differ "+
				"from the stream's (%d, %d, %d)", ErrSnapshotFormat, le.Uint64(b[16:]), le.Uint64(b[24:]),
				le.Uint64(b[32:]), sr.batches, sr.info.Records, sr.info.DataBytes))
		}
		sr.info.Bytes = sr.off - sr.start
		return nil, nil
	case indexMagic:
	default:
		return nil, sr.fail(at, fmt.Errorf("%w: expected an index or end block", ErrSnapshotFormat))
	}
	if got, want := blockCRC(b, 12), le.Uint32(b[12:]); got != want {
		return nil, sr.fail(at, fmt.Errorf("%w: index block crc %#x, stored %#x", ErrSnapshotChecksum, got, want))
	}
	count := le.Uint32(b[8:])
	if count == 0 || count > maxEntries || le.Uint64(b[16:]) != sr.batches {
		return nil, sr.fail(at, fmt.Errorf("%w: index block %d holds %d records", ErrSnapshotFormat, le.Uint64(b[16:]),
			count))
	}
	entries := make([]entry, count)
	payload := sr.off
	for i := range entries {
		o := 32 + i*entrySize
		e := entry{gpa: GuestAddress(le.Uint64(b[o:])), n: le.Uint64(b[o+8:]), kind: le.Uint32(b[o+16:])}
		zstdOK := e.kind == kindZstd && sr.version == SnapshotVersionCompressed
		if e.n == 0 || e.n%dirtyPage != 0 || uint64(e.gpa)%dirtyPage != 0 ||
			e.kind != kindData && e.kind != kindZero && !zstdOK || e.gpa < sr.next || e.n > uint64(MaxGuestAddress) {
			return nil, sr.fail(at, fmt.Errorf("%w: record %d [%v, +%#x) kind %d", ErrSnapshotFormat, i, e.gpa, e.n, e.kind))
		}
		if !sr.info.Layout.covers(e.gpa, e.n) {
			return nil, sr.fail(at, fmt.Errorf("%w: record [%v, +%#x) is not in the snapshot's guest RAM",
				ErrSnapshotLayout, e.gpa, e.n))
		}
		if e.kind == kindZstd {
			p := le.Uint64(b[o+24:])
			if p == 0 || p%blockSize != 0 || p > maxZstdPayload(e.n) {
				return nil, sr.fail(at, fmt.Errorf("%w: record %d [%v, +%#x): compressed length %#x", ErrSnapshotFormat,
					i, e.gpa, e.n, p))
			}
			e.plen = int64(p)
		}
		sr.next = e.gpa + GuestAddress(e.n)
		switch e.kind {
		case kindData:
			e.at = payload
			payload += int64(e.n)
			sr.info.DataBytes += e.n
		case kindZstd:
			e.at = payload
			payload += e.plen
			sr.info.DataBytes += e.n
		default:
			sr.info.ZeroBytes += e.n
		}
		sr.info.Records++
		entries[i] = e
	}
	return entries, nil
}

// sums reads the checksum block that ends a batch and compares it with got
// (nil: only the block's own checksum is checked).
func (sr *snapReader) sums(entries []entry, got []uint32) error {
	at := sr.off
	b := sr.block[:]
	if err := sr.readFull(b); err != nil {
		return err
	}
	le := binary.LittleEndian
	if string(b[:8]) != sumMagic || le.Uint32(b[8:]) != uint32(len(entries)) || le.Uint64(b[16:]) != sr.batches {
		return sr.fail(at, fmt.Errorf("%w: expected the checksum block of batch %d", ErrSnapshotFormat, sr.batches))
	}
	if c, want := blockCRC(b, 12), le.Uint32(b[12:]); c != want {
		return sr.fail(at, fmt.Errorf("%w: checksum block crc %#x, stored %#x", ErrSnapshotChecksum, c, want))
	}
	for i, e := range entries {
		entries[i].crc = le.Uint32(b[32+i*4:])
		if got != nil && e.kind != kindZero && got[i] != le.Uint32(b[32+i*4:]) {
			return sr.fail(e.at, fmt.Errorf("%w: data of [%v, +%#x): crc %#x, stored %#x", ErrSnapshotChecksum, e.gpa,
				e.n, got[i], le.Uint32(b[32+i*4:])))
		}
	}
	sr.batches++
	return nil
}

// covers reports whether [a, a+n) lies in guest RAM of the layout, which is
// valid and sorted by address.
func (l Layout) covers(a GuestAddress, n uint64) bool {
	if n > math.MaxUint64-uint64(a) {
		return false // the range wraps around the address space
	}
	pos, end := a, a+GuestAddress(n)
	for _, r := range l {
		if pos >= end {
			break
		}
		if r.End() <= pos {
			continue
		}
		if r.GPA > pos {
			return false
		}
		pos = min(end, r.End())
	}
	return pos >= end
}
