package guestmem

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// WorkingSet is the guest memory a restored guest touched first, in the
// order it did (REAP's and FaaSnap's working set): OnDemand.WorkingSet
// records it, and RestoreOnDemand with OnDemandOptions.WorkingSet fetches
// it first on the next restore of the same snapshot, ahead of the guest's
// faults. WriteTo and ReadWorkingSet store it beside the snapshot.
type WorkingSet struct {
	Snapshot [16]byte // the ID of the snapshot (the chain's last) it was recorded on
	Spans    []Span   // in fault order
}

// Bytes returns the guest bytes the set covers.
func (ws *WorkingSet) Bytes() uint64 {
	var n uint64
	for _, s := range ws.Spans {
		n += s.Size
	}
	return n
}

// The working-set file: a 32-byte header — magic "GMEMWSET", version u32,
// span count u32, snapshot ID [16] — then per span its GPA u64 and size u64,
// then the CRC-32C (Castagnoli) of everything before it, u32; all
// little-endian.
const (
	wsMagic    = "GMEMWSET"
	wsVersion  = 1
	wsMaxSpans = 1 << 24
)

// WriteTo writes the set in the working-set format (docs/guestmem.md).
func (ws *WorkingSet) WriteTo(w io.Writer) (int64, error) {
	le := binary.LittleEndian
	b := make([]byte, 32, 32+16*len(ws.Spans)+4)
	copy(b, wsMagic)
	le.PutUint32(b[8:], wsVersion)
	le.PutUint32(b[12:], uint32(len(ws.Spans)))
	copy(b[16:], ws.Snapshot[:])
	for _, s := range ws.Spans {
		b = le.AppendUint64(b, uint64(s.GPA))
		b = le.AppendUint64(b, s.Size)
	}
	b = le.AppendUint32(b, crc32.Checksum(b, castagnoli))
	n, err := w.Write(b)
	if err == nil && n < len(b) {
		err = io.ErrShortWrite
	}
	return int64(n), err
}

// ReadWorkingSet reads a working set WriteTo wrote. A file that is not one,
// or is truncated or corrupt, is an error wrapping ErrSnapshotFormat,
// ErrSnapshotTruncated or ErrSnapshotChecksum.
func ReadWorkingSet(r io.Reader) (*WorkingSet, error) {
	le := binary.LittleEndian
	hdr := make([]byte, 32)
	if _, err := io.ReadFull(r, hdr); err != nil {
		return nil, wsReadErr(err)
	}
	if string(hdr[:8]) != wsMagic {
		return nil, fmt.Errorf("guestmem: ReadWorkingSet: %w: not a working set", ErrSnapshotFormat)
	}
	if v := le.Uint32(hdr[8:]); v != wsVersion {
		return nil, fmt.Errorf("guestmem: ReadWorkingSet: %w: version %d, this package reads %d", ErrSnapshotVersion, v,
			wsVersion)
	}
	count := le.Uint32(hdr[12:])
	if count > wsMaxSpans {
		return nil, fmt.Errorf("guestmem: ReadWorkingSet: %w: %d spans", ErrSnapshotFormat, count)
	}
	body := make([]byte, 16*int(count)+4)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, wsReadErr(err)
	}
	crc := crc32.Update(crc32.Checksum(hdr, castagnoli), castagnoli, body[:len(body)-4])
	if want := le.Uint32(body[len(body)-4:]); crc != want {
		return nil, fmt.Errorf("guestmem: ReadWorkingSet: %w: crc %#x, stored %#x", ErrSnapshotChecksum, crc, want)
	}
	ws := &WorkingSet{Spans: make([]Span, count)}
	copy(ws.Snapshot[:], hdr[16:])
	for i := range ws.Spans {
		s := Span{GPA: GuestAddress(le.Uint64(body[16*i:])), Size: le.Uint64(body[16*i+8:])}
		if s.Size == 0 || uint64(s.GPA)+s.Size < uint64(s.GPA) {
			return nil, fmt.Errorf("guestmem: ReadWorkingSet: %w: span %d [%v, +%#x)", ErrSnapshotFormat, i, s.GPA, s.Size)
		}
		ws.Spans[i] = s
	}
	return ws, nil
}

func wsReadErr(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("guestmem: ReadWorkingSet: %w", ErrSnapshotTruncated)
	}
	return fmt.Errorf("guestmem: ReadWorkingSet: %w", err)
}
