package guestmem

// Compressed data records (docs/guestmem.md, "Snapshot stream format,
// version 2"): the payload of a kind 3 record is a frame table, one u32
// compressed length per frame, then the frames, each the zstd compression
// of up to zstdFrame bytes of the record's data in order, then zero padding
// to a multiple of 4096. A reader finds the frame of any page from the table
// without decompressing the others.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"sync"

	"github.com/klauspost/compress/zstd"
)

const (
	zstdFrame    = 64 << 10      // guest bytes per frame (the last may hold fewer)
	maxZstdFrame = 2 * zstdFrame // bound on one frame's compressed length
)

// zstdFrames is the number of frames of a compressed record of n bytes.
func zstdFrames(n uint64) uint64 { return (n + zstdFrame - 1) / zstdFrame }

// maxZstdPayload bounds the payload length of a compressed record of n bytes.
func maxZstdPayload(n uint64) uint64 {
	f := zstdFrames(n)
	return alignUp(4*f+f*maxZstdFrame, blockSize)
}

var (
	zstdEncoder = sync.OnceValue(func() *zstd.Encoder {
		e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
		if err != nil {
			panic(err) // constant options
		}
		return e
	})
	zstdDecoder = sync.OnceValue(func() *zstd.Decoder {
		d, err := zstd.NewReader(nil, zstd.WithDecoderMaxMemory(zstdFrame), zstd.WithDecoderConcurrency(0))
		if err != nil {
			panic(err) // constant options
		}
		return d
	})
)

// zstdWriter collects a compressed record's payload from the guest data the
// arena hands it. It copies each piece out of guest memory before
// compressing it, so a memory fault can only hit the copy (which the arena
// catches), never the encoder.
type zstdWriter struct {
	frame   []byte // data of the frame being filled
	payload []byte // frame table, then the frames so far
	frames  int
	crc     uint32 // of the data
}

func newZstdWriter(n uint64) *zstdWriter {
	f := zstdFrames(n)
	// A record shorter than a frame (a lone dirty page) gets a buffer its size.
	return &zstdWriter{frame: make([]byte, 0, min(n, zstdFrame)), payload: make([]byte, 4*f, 4*f+n/2)}
}

func (z *zstdWriter) Write(b []byte) (int, error) {
	for n := 0; n < len(b); {
		k := copy(z.frame[len(z.frame):cap(z.frame)], b[n:])
		z.frame = z.frame[:len(z.frame)+k]
		n += k
		if len(z.frame) == cap(z.frame) {
			z.cut()
		}
	}
	return len(b), nil
}

// cut compresses the frame filled so far.
func (z *zstdWriter) cut() {
	if len(z.frame) == 0 {
		return
	}
	z.crc = crc32.Update(z.crc, castagnoli, z.frame)
	before := len(z.payload)
	z.payload = zstdEncoder().EncodeAll(z.frame, z.payload)
	binary.LittleEndian.PutUint32(z.payload[4*z.frames:], uint32(len(z.payload)-before))
	z.frames++
	z.frame = z.frame[:0]
}

// finish returns the padded payload.
func (z *zstdWriter) finish() []byte {
	z.cut()
	n := alignUp(uint64(len(z.payload)), blockSize)
	return append(z.payload, make([]byte, n-uint64(len(z.payload)))...)
}

// inflate reads the payload of the compressed record e, which starts at the
// reader's position, checks its frame table, decompresses each frame and
// hands its data to put (if not nil) at its offset in the record. It
// returns the CRC-32C of the data. Every problem is a *SnapshotError: a
// table that does not add up to the payload length, a frame that decodes
// to the wrong length or non-zero padding is ErrSnapshotFormat, a frame
// that does not decode ErrSnapshotChecksum (it is corrupt), and a stream
// that ends inside the payload ErrSnapshotTruncated.
func (sr *snapReader) inflate(e entry, put func(off uint64, p []byte) error) (uint32, error) {
	le := binary.LittleEndian
	f := zstdFrames(e.n)
	if 4*f > uint64(e.plen) {
		return 0, sr.fail(e.at, fmt.Errorf("%w: data of [%v, +%#x): %d frames do not fit %d bytes", ErrSnapshotFormat,
			e.gpa, e.n, f, e.plen))
	}
	table := make([]byte, 4*f)
	if err := sr.readFull(table); err != nil {
		return 0, err
	}
	used := 4 * f
	for i := range f {
		l := uint64(le.Uint32(table[4*i:]))
		if l == 0 || l > maxZstdFrame {
			return 0, sr.fail(e.at, fmt.Errorf("%w: data of [%v, +%#x): frame %d is %d bytes", ErrSnapshotFormat,
				e.gpa, e.n, i, l))
		}
		used += l
	}
	if used > uint64(e.plen) || uint64(e.plen)-used >= blockSize {
		return 0, sr.fail(e.at, fmt.Errorf("%w: data of [%v, +%#x): the frame table adds up to %d bytes, the payload "+
			"is %d", ErrSnapshotFormat, e.gpa, e.n, used, e.plen))
	}
	src := make([]byte, maxZstdFrame)
	dst := make([]byte, 0, zstdFrame)
	var crc uint32
	for i := range f {
		at := sr.off
		s := src[:le.Uint32(table[4*i:])]
		if err := sr.readFull(s); err != nil {
			return 0, err
		}
		want := min(zstdFrame, e.n-i*zstdFrame)
		var err error
		dst, err = zstdDecoder().DecodeAll(s, dst[:0])
		switch {
		case errors.Is(err, zstd.ErrDecoderSizeExceeded) || err == nil && uint64(len(dst)) != want:
			return 0, sr.fail(at, fmt.Errorf("%w: data of [%v, +%#x): frame %d does not decode to %d bytes",
				ErrSnapshotFormat, e.gpa, e.n, i, want))
		case err != nil:
			return 0, sr.fail(at, fmt.Errorf("%w: data of [%v, +%#x): frame %d: %w", ErrSnapshotChecksum, e.gpa, e.n,
				i, err))
		}
		crc = crc32.Update(crc, castagnoli, dst)
		if put != nil {
			if err := put(i*zstdFrame, dst); err != nil {
				return 0, err
			}
		}
	}
	pad := src[:uint64(e.plen)-used]
	at := sr.off
	if err := sr.readFull(pad); err != nil {
		return 0, err
	}
	for _, c := range pad {
		if c != 0 {
			return 0, sr.fail(at, fmt.Errorf("%w: data of [%v, +%#x): padding is not zero", ErrSnapshotFormat, e.gpa,
				e.n))
		}
	}
	return crc, nil
}
