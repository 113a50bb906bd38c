package guestmem_test

// Regression tests for paths that used to report success after losing guest
// data: bytes after an end block, and a failed full Save that had already
// reset the dirty set.

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
)

// chainInOneStream writes a full Save and then an incremental one to the same
// writer, as a VMM keeping one snapshot file does, and returns the stream and
// the image of guest RAM after the second write.
func chainInOneStream(t *testing.T) ([]byte, []byte) {
	t.Helper()
	m := newMemory(t, snapLayout)
	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	scribble(t, m, 0x11)
	var buf bytes.Buffer
	_, err := m.Save(context.Background(), &buf, guestmem.SaveOptions{})
	require.NoError(t, err)
	scribble(t, m, 0x22)
	require.NoError(t, m.Discard(16*mib, 2*mib)) // a zero record in the increment
	_, err = m.Save(context.Background(), &buf, guestmem.SaveOptions{Incremental: true})
	require.NoError(t, err)
	return buf.Bytes(), image(t, m)
}

func TestSnapshotChainInOneStream(t *testing.T) {
	stream, want := chainInOneStream(t)
	ctx := context.Background()

	info, err := guestmem.Verify(ctx, bytes.NewReader(stream))
	require.NoError(t, err)
	require.Len(t, info.Parts, 2, "Verify reads both snapshots")
	require.False(t, info.Parts[0].Incremental)
	require.True(t, info.Parts[1].Incremental)
	require.Equal(t, info.Parts[0].ID, info.Parts[1].Base)
	require.Equal(t, info.Parts[1].ID, info.ID, "the chain's ID is its last snapshot's")
	require.Equal(t, int64(len(stream)), info.Bytes)
	require.Equal(t, info.Parts[0].Bytes+info.Parts[1].Bytes, info.Bytes)
	require.NotZero(t, info.Parts[1].ZeroBytes)

	r, err := guestmem.Restore(ctx, []io.Reader{bytes.NewReader(stream)})
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, image(t, r)), "eager Restore applies the increment too")
	require.NoError(t, r.Close())

	l, err := guestmem.RestoreLazy(ctx, []*os.File{writeFile(t, stream)})
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, image(t, l)), "RestoreLazy applies the increment too")
	require.NoError(t, l.Close())

	// The chain may also continue in another stream: base+inc in one, a
	// second increment in the next.
	m := newMemory(t, snapLayout)
	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	var a, b bytes.Buffer
	_, err = m.Save(ctx, &a, guestmem.SaveOptions{})
	require.NoError(t, err)
	scribble(t, m, 0x33)
	_, err = m.Save(ctx, &a, guestmem.SaveOptions{Incremental: true})
	require.NoError(t, err)
	scribble(t, m, 0x44)
	_, err = m.Save(ctx, &b, guestmem.SaveOptions{Incremental: true})
	require.NoError(t, err)
	r, err = guestmem.Restore(ctx, []io.Reader{bytes.NewReader(a.Bytes()), bytes.NewReader(b.Bytes())})
	require.NoError(t, err)
	require.True(t, bytes.Equal(image(t, m), image(t, r)))
	require.NoError(t, r.Close())
}

func TestSnapshotTrailingBytesAreAnError(t *testing.T) {
	m := newMemory(t, snapLayout)
	scribble(t, m, 0x55)
	full, _ := save(t, m, false)
	other := newMemory(t, snapLayout)
	unrelated, _ := save(t, other, false) // a full snapshot, not an increment on full

	stream, _ := chainInOneStream(t)
	cut := len(stream) - 4096 // the increment without its end block

	cases := []struct {
		name   string
		stream []byte
		want   error
		at     int64
	}{
		{"three garbage bytes", append(bytes.Clone(full), 1, 2, 3), guestmem.ErrSnapshotFormat, int64(len(full))},
		{"a zero block", append(bytes.Clone(full), make([]byte, 4096)...), guestmem.ErrSnapshotFormat, int64(len(full))},
		{"a second full snapshot", append(bytes.Clone(full), unrelated...), guestmem.ErrSnapshotChain, int64(len(full))},
		{"the same snapshot twice", append(bytes.Clone(full), full...), guestmem.ErrSnapshotChain, int64(len(full))},
		{"a truncated increment", stream[:cut], guestmem.ErrSnapshotTruncated, -1},
	}
	ctx := context.Background()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			check := func(what string, err error) {
				t.Helper()
				require.ErrorIs(t, err, c.want, what)
				var se *guestmem.SnapshotError
				require.True(t, errors.As(err, &se), "%s: %v is a *SnapshotError", what, err)
				if c.at >= 0 {
					require.Equal(t, c.at, se.Offset, what)
				}
			}
			_, err := guestmem.Verify(ctx, bytes.NewReader(c.stream))
			check("Verify", err)
			mem, err := guestmem.Restore(ctx, []io.Reader{bytes.NewReader(c.stream)})
			require.Nil(t, mem)
			check("Restore", err)
			mem, err = guestmem.RestoreLazy(ctx, []*os.File{writeFile(t, c.stream)})
			require.Nil(t, mem)
			check("RestoreLazy", err)
		})
	}
}

// failingWriter accepts limit bytes, then fails.
type failingWriter struct {
	limit int
	n     int
}

var errWriter = errors.New("disk full")

func (w *failingWriter) Write(p []byte) (int, error) {
	if w.n+len(p) > w.limit {
		k := max(0, w.limit-w.n)
		w.n += k
		return k, errWriter
	}
	w.n += len(p)
	return len(p), nil
}

// cancelWriter cancels its context after limit bytes (and keeps accepting).
type cancelWriter struct {
	limit  int
	n      int
	cancel context.CancelFunc
}

func (w *cancelWriter) Write(p []byte) (int, error) {
	w.n += len(p)
	if w.n >= w.limit {
		w.cancel()
	}
	return len(p), nil
}

// After a full Save fails part way, the dirty state is as if it had not
// been tried: an increment on the earlier base still holds every page
// written since that base.
func TestFailedFullSaveKeepsDirtyPages(t *testing.T) {
	for _, compress := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "compressed"}[compress], func(t *testing.T) {
			testFailedFullSave(t, guestmem.SaveOptions{Compress: compress})
		})
	}
}

func testFailedFullSave(t *testing.T, opts guestmem.SaveOptions) {
	ctx := context.Background()
	// Find how long a full Save of the scribbled memory is, to fail inside it.
	probe := newMemory(t, snapLayout)
	scribble(t, probe, 0x66)
	var probeBuf bytes.Buffer
	_, err := probe.Save(ctx, &probeBuf, opts)
	require.NoError(t, err)
	full := probeBuf.Bytes()

	for _, failAt := range []int{0, 4096, 3 * 4096, len(full) / 2, len(full) - 4096, len(full) - 1} {
		for _, how := range []string{"writer", "context"} {
			m := newMemory(t, snapLayout)
			require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
			var base bytes.Buffer
			_, err := m.Save(ctx, &base, opts)
			require.NoError(t, err)
			written := scribble(t, m, 0x66) // the same pages as probe's

			switch how {
			case "writer":
				_, err = m.Save(ctx, &failingWriter{limit: failAt}, opts)
				require.ErrorIs(t, err, errWriter, "fail at %d", failAt)
			case "context":
				cctx, cancel := context.WithCancel(ctx)
				_, err = m.Save(cctx, &cancelWriter{limit: failAt, cancel: cancel}, opts)
				cancel()
				if failAt >= len(full)-4096 {
					// Cancelled at the end block: Save may already be done.
					if err == nil {
						continue
					}
				}
				require.ErrorIs(t, err, context.Canceled, "cancel at %d", failAt)
			}

			var inc bytes.Buffer
			_, err = m.Save(ctx, &inc, guestmem.SaveOptions{Incremental: true})
			require.NoError(t, err, "the increment on the old base is still possible (%s fails at %d)", how, failAt)
			info, err := guestmem.Verify(ctx, bytes.NewReader(inc.Bytes()))
			require.NoError(t, err)
			require.Equal(t, uint64(len(written))*4096, info.DataBytes,
				"%s fails at %d: the increment holds every page written since the base", how, failAt)
			r, err := guestmem.Restore(ctx, []io.Reader{bytes.NewReader(base.Bytes()), bytes.NewReader(inc.Bytes())})
			require.NoError(t, err)
			require.True(t, bytes.Equal(image(t, m), image(t, r)), "%s fails at %d: base+increment restores", how, failAt)
			require.NoError(t, r.Close())
			require.NoError(t, m.Close())
		}
	}
}

// The one-file forms restore a chain kept in one file, eagerly and lazily.
func TestRestoreFromOneFile(t *testing.T) {
	stream, want := chainInOneStream(t)
	path := writeFile(t, stream).Name()
	ctx := context.Background()
	r, err := guestmem.RestoreFile(ctx, path)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, image(t, r)))
	require.NoError(t, r.Close())
	l, err := guestmem.RestoreLazyFile(ctx, path)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, image(t, l)))
	require.NoError(t, l.Close())
	_, err = guestmem.RestoreFile(ctx, path+".missing")
	require.ErrorIs(t, err, os.ErrNotExist)
	oneVoice(t, "missing file", err)
}
