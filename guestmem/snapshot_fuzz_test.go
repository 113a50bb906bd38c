package guestmem_test

import (
	"bytes"
	"context"
	"io"
	"testing"

	"github.com/gmem-vmm/gmem/guestmem"
)

// FuzzRestore feeds edited and truncated snapshot streams (a full one, or an
// increment on top of its base) to Restore and Verify. Neither may panic; a
// stream Restore accepts, Verify accepts; a rejected one returns no memory.
func FuzzRestore(f *testing.F) {
	m, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: 64 << 10}, {GPA: 1 << 20, Size: 32 << 10, ReadOnly: true}})
	if err != nil {
		f.Fatal(err)
	}
	defer m.Close()
	_ = m.WriteUint64(0x1000, 0xfeed)
	_ = m.WriteUint64(1<<20+0x2000, 0xbeef)
	if err := m.StartDirtyTracking(guestmem.HostWritesOnly()); err != nil {
		f.Fatal(err)
	}
	// streams[0] is a full snapshot and streams[1] an increment on it;
	// streams[2] and [3] the same compressed (version 2).
	var streams [4]bytes.Buffer
	for i, o := range []guestmem.SaveOptions{{}, {Incremental: true}, {Compress: true}, {Incremental: true, Compress: true}} {
		if _, err := m.Save(context.Background(), &streams[i], o); err != nil {
			f.Fatal(err)
		}
		_ = m.WriteUint64(0x3000, uint64(i)+1)
	}
	// The fuzzer edits a valid stream (which picks it) rather than inventing one: 4 KiB blocks
	// make raw inputs too large for the mutator to explore quickly. Each
	// three bytes of edits XOR one byte (two bytes of position, scaled to the
	// stream, then the value); cut truncates the stream.
	f.Add([]byte{}, uint32(0), uint8(0))
	f.Add([]byte{0, 40, 1}, uint32(0), uint8(1))
	f.Add([]byte{16, 1, 0x80, 200, 7, 3}, uint32(9000), uint8(0))
	f.Add([]byte{}, uint32(0), uint8(2))
	f.Add([]byte{}, uint32(0), uint8(3))
	f.Add([]byte{64, 0, 0x10}, uint32(0), uint8(2))    // in the frame table
	f.Add([]byte{66, 0, 0x01}, uint32(8300), uint8(2)) // in a frame, and cut inside it
	f.Fuzz(func(t *testing.T, edits []byte, cut uint32, which uint8) {
		which %= 4
		incremental := which%2 == 1
		src := streams[which].Bytes()
		base := &streams[which-which%2]
		b := bytes.Clone(src)
		for i := 0; i+2 < len(edits); i += 3 {
			pos := (int(edits[i])<<8 | int(edits[i+1])) * len(b) >> 16
			b[pos] ^= edits[i+2]
		}
		if cut > 0 {
			b = b[:int(cut)%len(b)]
		}
		_, verr := guestmem.Verify(context.Background(), bytes.NewReader(b))
		chain := []io.Reader{bytes.NewReader(b)}
		if incremental {
			chain = []io.Reader{bytes.NewReader(base.Bytes()), bytes.NewReader(b)}
		}
		r, rerr := guestmem.Restore(context.Background(), chain, guestmem.WithMaxAddress(1<<26))
		if rerr != nil {
			if r != nil {
				t.Fatalf("Restore returned memory with an error: %v", rerr)
			}
			return
		}
		defer r.Close()
		if verr != nil {
			t.Fatalf("Restore accepted a stream Verify rejects: %v", verr)
		}
		if len(edits) < 3 && cut == 0 {
			v, err := r.ReadUint64(0x1000)
			if err != nil || v != 0xfeed {
				t.Fatalf("an untouched stream restores %#x, %v", v, err)
			}
		}
	})
}
