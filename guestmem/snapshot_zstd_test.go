package guestmem_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

func saveOpts(t testing.TB, m *guestmem.Memory, w *bytes.Buffer, o guestmem.SaveOptions) guestmem.SaveStats {
	t.Helper()
	before := w.Len()
	st, err := m.Save(context.Background(), w, o)
	require.NoError(t, err)
	require.Equal(t, int64(w.Len()-before), st.Bytes)
	return st
}

// restoreAll restores stream three ways (Restore into both backings and
// RestoreLazy) and checks each against want.
func restoreAll(t *testing.T, stream, want []byte) {
	t.Helper()
	ctx := context.Background()
	for _, into := range []guestmem.Backing{guestmem.Anonymous, guestmem.Memfd} {
		r, err := guestmem.Restore(ctx, []io.Reader{bytes.NewReader(stream)}, withBacking(into))
		require.NoError(t, err)
		require.True(t, bytes.Equal(want, image(t, r)), "eager restore into %v", into)
		require.NoError(t, r.Close())
	}
	f := writeFile(t, stream)
	sum := sha256.Sum256(stream)
	l, err := guestmem.RestoreLazy(ctx, []*os.File{f})
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, image(t, l)), "lazy restore")
	scribble(t, l, 0x999)
	require.NoError(t, l.Close())
	got, err := os.ReadFile(f.Name())
	require.NoError(t, err)
	require.Equal(t, sum, sha256.Sum256(got), "the file is never written")
}

func TestSnapshotCompressedRoundTrip(t *testing.T) {
	for _, backing := range []guestmem.Backing{guestmem.Anonymous, guestmem.Memfd} {
		t.Run(backing.String(), func(t *testing.T) {
			m := newMemory(t, snapLayout, withBacking(backing))
			pages := scribble(t, m, 0xabc)
			// A run of pages longer than a frame and than a record.
			big := bytes.Repeat([]byte("compressible guest data "), 3*mib/24)
			_, err := m.WriteAt(big, 1*mib)
			require.NoError(t, err)
			want := image(t, m)
			var plain, packed bytes.Buffer
			ps := saveOpts(t, m, &plain, guestmem.SaveOptions{})
			cs := saveOpts(t, m, &packed, guestmem.SaveOptions{Compress: true})
			require.Equal(t, uint32(2), binary.LittleEndian.Uint32(packed.Bytes()[8:]), "version 2")
			require.Equal(t, uint32(1), binary.LittleEndian.Uint32(plain.Bytes()[8:]), "version 1")
			require.Equal(t, ps.DataBytes, cs.DataBytes, "DataBytes counts guest bytes")
			require.GreaterOrEqual(t, cs.DataBytes, uint64(len(pages))*4096)
			require.Less(t, cs.Bytes*2, ps.Bytes, "compressed is smaller (%d vs %d bytes)", cs.Bytes, ps.Bytes)
			require.Zero(t, cs.Bytes%4096)

			info, err := guestmem.Verify(context.Background(), bytes.NewReader(packed.Bytes()))
			require.NoError(t, err)
			require.Equal(t, cs.ID, info.ID)
			require.Equal(t, cs.DataBytes, info.DataBytes)
			require.Equal(t, cs.Bytes, info.Bytes)
			restoreAll(t, packed.Bytes(), want)
		})
	}
}

func TestSnapshotCompressedChain(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		name       string
		base, incr bool // compressed
	}{
		{"compressed on compressed", true, true},
		{"compressed on plain", false, true},
		{"plain on compressed", true, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			m := newMemory(t, snapLayout)
			require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
			scribble(t, m, 0x11)
			var stream bytes.Buffer
			saveOpts(t, m, &stream, guestmem.SaveOptions{Compress: c.base})
			baseLen := stream.Len()
			scribble(t, m, 0x22)
			require.NoError(t, m.Discard(16*mib, 2*mib)) // a zero record
			st := saveOpts(t, m, &stream, guestmem.SaveOptions{Incremental: true, Compress: c.incr})
			require.NotZero(t, st.ZeroBytes)
			want := image(t, m)

			info, err := guestmem.Verify(ctx, bytes.NewReader(stream.Bytes()))
			require.NoError(t, err)
			require.Len(t, info.Parts, 2)
			require.Equal(t, info.Parts[0].ID, info.Parts[1].Base)
			restoreAll(t, stream.Bytes(), want)

			// The same chain as two files.
			l, err := guestmem.RestoreLazy(ctx, []*os.File{writeFile(t, stream.Bytes()[:baseLen]),
				writeFile(t, stream.Bytes()[baseLen:])})
			require.NoError(t, err)
			require.True(t, bytes.Equal(want, image(t, l)))
			require.NoError(t, l.Close())
		})
	}
}

func TestSnapshotCompressedCorruption(t *testing.T) {
	m := newMemory(t, snapLayout)
	scribble(t, m, 0x77)
	var buf bytes.Buffer
	saveOpts(t, m, &buf, guestmem.SaveOptions{Compress: true})
	snap := buf.Bytes()
	le := binary.LittleEndian
	// The header is one block; the first index block follows, and its
	// first record's payload starts the next block: a frame table of one
	// frame (scribble's records are single pages), then the frame.
	const idx, rec, payload = 4096, 4096 + 32, 8192
	require.Equal(t, uint32(3), le.Uint32(snap[rec+16:]), "a compressed record")
	require.Equal(t, uint64(4096), le.Uint64(snap[rec+8:]))
	frame := int(le.Uint32(snap[payload:]))
	plen := int(le.Uint64(snap[rec+24:]))
	require.Equal(t, 4096, plen)
	count := int(le.Uint32(snap[idx+8:]))
	sumAt := payload
	for i := range count {
		sumAt += int(le.Uint64(snap[idx+32+32*i+24:]))
	}
	require.Equal(t, "GMEMSUM\x00", string(snap[sumAt:sumAt+8]))

	edit := func(f func(b []byte)) []byte {
		b := bytes.Clone(snap)
		f(b)
		return b
	}
	fixIndex := func(b []byte) { le.PutUint32(b[idx+12:], blockCRC(b[idx:idx+4096], 12)) }
	cases := []struct {
		name   string
		stream []byte
		want   error
	}{
		{"a frame's checksum", edit(func(b []byte) { b[payload+4+frame-1] ^= 0x40 }), guestmem.ErrSnapshotChecksum},
		{"a frame's magic", edit(func(b []byte) { b[payload+4] ^= 0xff }), guestmem.ErrSnapshotChecksum},
		{"data other than its checksum", edit(func(b []byte) {
			le.PutUint32(b[sumAt+32:], le.Uint32(b[sumAt+32:])^1)
			le.PutUint32(b[sumAt+12:], blockCRC(b[sumAt:sumAt+4096], 12))
		}), guestmem.ErrSnapshotChecksum},
		{"a frame table that does not add up", edit(func(b []byte) {
			le.PutUint32(b[payload:], uint32(frame+4096))
		}), guestmem.ErrSnapshotFormat},
		{"a frame table with an empty frame", edit(func(b []byte) { le.PutUint32(b[payload:], 0) }),
			guestmem.ErrSnapshotFormat},
		{"a frame of the wrong length", edit(func(b []byte) {
			le.PutUint64(b[rec+8:], 8192) // the record claims two pages; its one frame holds one
			fixIndex(b)
		}), guestmem.ErrSnapshotFormat},
		{"a payload length not in blocks", edit(func(b []byte) {
			le.PutUint64(b[rec+24:], 4000)
			fixIndex(b)
		}), guestmem.ErrSnapshotFormat},
		{"padding that is not zero", edit(func(b []byte) { b[payload+plen-1] = 1 }), guestmem.ErrSnapshotFormat},
		{"compressed records in a version 1 stream", edit(func(b []byte) {
			le.PutUint32(b[8:], 1)
			le.PutUint32(b[28:], blockCRC(b[:4096], 28))
		}), guestmem.ErrSnapshotFormat},
		{"truncated in the frame table", snap[:payload+2], guestmem.ErrSnapshotTruncated},
		{"truncated inside a frame", snap[:payload+4+frame/2], guestmem.ErrSnapshotTruncated},
		{"truncated in the padding", snap[:payload+4+frame+1], guestmem.ErrSnapshotTruncated},
	}
	ctx := context.Background()
	mapsBefore, fdsBefore := testenv.GuestMappings(t), testenv.OpenFDs(t)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			check := func(what string, err error) {
				t.Helper()
				require.ErrorIs(t, err, c.want, what)
				var se *guestmem.SnapshotError
				require.True(t, errors.As(err, &se), "%s: %v is a *SnapshotError", what, err)
			}
			_, err := guestmem.Verify(ctx, bytes.NewReader(c.stream))
			check("Verify", err)
			r, err := guestmem.Restore(ctx, []io.Reader{bytes.NewReader(c.stream)})
			require.Nil(t, r)
			check("Restore", err)
			l, err := guestmem.RestoreLazy(ctx, []*os.File{writeFile(t, c.stream)}) // closed with the subtest
			require.Nil(t, l)
			check("RestoreLazy", err)
		})
	}
	// Truncations: every 512 bytes through the first payloads, then a
	// sample (each Restore builds memory, so all would be slow).
	for cut := 0; cut < len(snap); cut += map[bool]int{true: 512, false: 37<<10 + 512}[cut < 16<<10] {
		_, err := guestmem.Verify(ctx, bytes.NewReader(snap[:cut]))
		require.ErrorIs(t, err, guestmem.ErrSnapshotTruncated, "cut at %d", cut)
		r, err := guestmem.Restore(ctx, []io.Reader{bytes.NewReader(snap[:cut])})
		require.Nil(t, r)
		require.ErrorIs(t, err, guestmem.ErrSnapshotTruncated, "cut at %d", cut)
	}
	require.Equal(t, mapsBefore, testenv.GuestMappings(t), "failed restores leave no guest mapping behind")
	require.Equal(t, fdsBefore, testenv.OpenFDs(t), "nor an fd")
}
