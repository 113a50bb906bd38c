package vhostuser_test

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/vhostuser"
)

func region(gpa, size uint64) vhostuser.MemoryRegion {
	return vhostuser.MemoryRegion{GuestPhysAddr: gpa, MemorySize: size, UserspaceAddr: 0x7f00_0000_0000 + gpa,
		MmapOffset: gpa}
}

// The encodings are the specification's, byte by byte.
func TestWireLayout(t *testing.T) {
	p, err := vhostuser.EncodeMemTable([]vhostuser.MemoryRegion{{GuestPhysAddr: 1, MemorySize: 2, UserspaceAddr: 3, MmapOffset: 4}})
	require.NoError(t, err)
	want := binary.NativeEndian.AppendUint32(nil, 1)
	want = binary.NativeEndian.AppendUint32(want, 0)
	for _, v := range []uint64{1, 2, 3, 4} {
		want = binary.NativeEndian.AppendUint64(want, v)
	}
	require.Equal(t, want, p)

	single := vhostuser.EncodeMemRegion(vhostuser.MemoryRegion{GuestPhysAddr: 1, MemorySize: 2, UserspaceAddr: 3, MmapOffset: 4})
	require.Len(t, single, 40)
	require.Equal(t, make([]byte, 8), single[:8], "8 bytes of padding")
	require.Equal(t, want[8:], single[8:])

	l := vhostuser.LogArea{Size: 0x100, Offset: 0x40}.Encode()
	require.Equal(t, append(binary.NativeEndian.AppendUint64(nil, 0x100), binary.NativeEndian.AppendUint64(nil, 0x40)...), l)

	require.Equal(t, uint64(8), vhostuser.LogSize(1))
	require.Equal(t, uint64(8), vhostuser.LogSize(64*4096))
	require.Equal(t, uint64(16), vhostuser.LogSize(64*4096+1))
	require.Equal(t, uint64(1<<30/4096/8), vhostuser.LogSize(1<<30))
}

func memTable(n uint32, regions ...vhostuser.MemoryRegion) []byte {
	b := binary.NativeEndian.AppendUint32(nil, n)
	b = binary.NativeEndian.AppendUint32(b, 0)
	for _, r := range regions {
		for _, v := range []uint64{r.GuestPhysAddr, r.MemorySize, r.UserspaceAddr, r.MmapOffset} {
			b = binary.NativeEndian.AppendUint64(b, v)
		}
	}
	return b
}

// Every malformed memory message is a *ProtocolError wrapping ErrMalformed
// that says what is wrong.
func TestDecodeRefusesMalformed(t *testing.T) {
	nine := make([]vhostuser.MemoryRegion, 9)
	for i := range nine {
		nine[i] = region(uint64(i)<<30, 4096)
	}
	for _, tc := range []struct {
		name   string
		decode func() error
		says   string
	}{
		{"short table", func() error { _, err := vhostuser.DecodeMemTable([]byte{1, 0, 0}, 0); return err }, "at least 8"},
		{"too many regions", func() error { _, err := vhostuser.DecodeMemTable(memTable(9, nine...), 9); return err }, "9 regions"},
		{"table shorter than its count", func() error {
			_, err := vhostuser.DecodeMemTable(memTable(2, region(0, 4096)), 2)
			return err
		}, "for 2 regions"},
		{"fd count", func() error {
			_, err := vhostuser.DecodeMemTable(memTable(2, region(0, 4096), region(1<<20, 4096)), 1)
			return err
		}, "1 file descriptors for 2 regions"},
		{"overlap", func() error {
			_, err := vhostuser.DecodeMemTable(memTable(2, region(0, 8192), region(4096, 4096)), 2)
			return err
		}, "overlaps"},
		{"empty region", func() error { _, err := vhostuser.DecodeMemTable(memTable(1, region(0, 0)), 1); return err }, "size 0"},
		{"wrapping region", func() error {
			_, err := vhostuser.DecodeMemTable(memTable(1, vhostuser.MemoryRegion{GuestPhysAddr: ^uint64(0) - 10, MemorySize: 4096}), 1)
			return err
		}, "wraps"},
		{"short single region", func() error {
			_, err := vhostuser.DecodeMemRegion(vhostuser.AddMemReg, make([]byte, 32), 1)
			return err
		}, "want 40"},
		{"ADD without fd", func() error {
			_, err := vhostuser.DecodeMemRegion(vhostuser.AddMemReg, vhostuser.EncodeMemRegion(region(0, 4096)), 0)
			return err
		}, "want 1"},
		{"REM with two fds", func() error {
			_, err := vhostuser.DecodeMemRegion(vhostuser.RemMemReg, vhostuser.EncodeMemRegion(region(0, 4096)), 2)
			return err
		}, "want none"},
		{"log short", func() error { _, err := vhostuser.DecodeLogArea(make([]byte, 8), 1); return err }, "want 16"},
		{"log without fd", func() error {
			_, err := vhostuser.DecodeLogArea(vhostuser.LogArea{Size: 8}.Encode(), 0)
			return err
		}, "want 1"},
		{"log unaligned", func() error {
			_, err := vhostuser.DecodeLogArea(vhostuser.LogArea{Size: 8, Offset: 3}.Encode(), 1)
			return err
		}, "multiples of 8"},
		{"wrong version", func() error {
			h := binary.NativeEndian.AppendUint32(nil, uint32(vhostuser.SetMemTable))
			h = binary.NativeEndian.AppendUint32(h, 2)
			h = binary.NativeEndian.AppendUint32(h, 0)
			_, err := vhostuser.DecodeHeader(h)
			return err
		}, "version 2"},
		{"huge payload", func() error {
			h := binary.NativeEndian.AppendUint32(nil, uint32(vhostuser.SetMemTable))
			h = binary.NativeEndian.AppendUint32(h, vhostuser.Version)
			h = binary.NativeEndian.AppendUint32(h, 1<<20)
			_, err := vhostuser.DecodeHeader(h)
			return err
		}, "exceeds"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.decode()
			require.ErrorIs(t, err, vhostuser.ErrMalformed)
			var pe *vhostuser.ProtocolError
			require.True(t, errors.As(err, &pe))
			require.Contains(t, err.Error(), tc.says)
		})
	}
	// A table padded to 8 regions, as some front ends send, is fine.
	p := memTable(1, append([]vhostuser.MemoryRegion{region(0, 4096)}, make([]vhostuser.MemoryRegion, 7)...)...)
	got, err := vhostuser.DecodeMemTable(p, 1)
	require.NoError(t, err)
	require.Equal(t, []vhostuser.MemoryRegion{region(0, 4096)}, got)
}

// rawFrontend sends hand-made messages to a Backend, and reads its replies.
type rawFrontend struct {
	t *testing.T
	c *net.UnixConn
	b *vhostuser.Backend
}

func newRaw(t *testing.T) *rawFrontend {
	fc, bc := connPair(t)
	b := vhostuser.NewBackend(bc, vhostuser.BackendConfig{})
	t.Cleanup(func() { fc.Close(); b.Close() })
	return &rawFrontend{t: t, c: fc, b: b}
}

func (r *rawFrontend) send(req vhostuser.Request, flags uint32, payload []byte, fds ...int) {
	r.t.Helper()
	h := binary.NativeEndian.AppendUint32(nil, uint32(req))
	h = binary.NativeEndian.AppendUint32(h, flags)
	h = binary.NativeEndian.AppendUint32(h, uint32(len(payload)))
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err := r.c.WriteMsgUnix(append(h, payload...), oob, nil)
	require.NoError(r.t, err)
}

// handle sends one message and returns the Backend's error for it.
func (r *rawFrontend) handle(req vhostuser.Request, flags uint32, payload []byte, fds ...int) error {
	r.t.Helper()
	r.send(req, flags, payload, fds...)
	_, err := r.b.Next()
	return err
}

func memfd(t *testing.T, size int64) int {
	fd, err := unix.MemfdCreate("test", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	require.NoError(t, unix.Ftruncate(fd, size))
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// The Backend refuses malformed messages with clear errors and keeps no fd
// it was sent; nothing is mapped by a refused table.
func TestBackendRefusesMalformedMessages(t *testing.T) {
	const v = vhostuser.Version
	fd := memfd(t, 1<<20)
	before := fdCount(t)
	for _, tc := range []struct {
		name string
		run  func(r *rawFrontend) error
		is   error
		says string
	}{
		{"wrong version", func(r *rawFrontend) error { return r.handle(vhostuser.GetFeatures, 2, nil) }, vhostuser.ErrMalformed, "version"},
		{"fds on GET_FEATURES", func(r *rawFrontend) error { return r.handle(vhostuser.GetFeatures, v, nil, fd) },
			vhostuser.ErrMalformed, "unexpected file descriptors"},
		{"too many fds", func(r *rawFrontend) error {
			return r.handle(vhostuser.SetMemTable, v, memTable(0), fd, fd, fd, fd, fd, fd, fd, fd, fd)
		}, vhostuser.ErrMalformed, "file descriptors"},
		{"table with one fd short", func(r *rawFrontend) error {
			return r.handle(vhostuser.SetMemTable, v, memTable(2, region(0, 4096), region(1<<20, 4096)), fd)
		}, vhostuser.ErrMalformed, "1 file descriptors for 2 regions"},
		{"overlapping table", func(r *rawFrontend) error {
			return r.handle(vhostuser.SetMemTable, v, memTable(2, region(0, 8192), vhostuser.MemoryRegion{GuestPhysAddr: 4096, MemorySize: 4096}), fd, fd)
		}, vhostuser.ErrMalformed, "overlaps"},
		{"region past its fd", func(r *rawFrontend) error {
			return r.handle(vhostuser.SetMemTable, v, memTable(1, vhostuser.MemoryRegion{MemorySize: 2 << 20}), fd)
		}, vhostuser.ErrMalformed, "past the end of its fd"},
		{"ADD before CONFIGURE_MEM_SLOTS", func(r *rawFrontend) error {
			return r.handle(vhostuser.AddMemReg, v, vhostuser.EncodeMemRegion(vhostuser.MemoryRegion{MemorySize: 4096}), fd)
		}, vhostuser.ErrMalformed, "without negotiating"},
		{"short u64", func(r *rawFrontend) error { return r.handle(vhostuser.SetFeatures, v, []byte{1}) }, vhostuser.ErrMalformed, "want 8"},
		{"unknown request", func(r *rawFrontend) error { return r.handle(99, v, nil) }, errors.ErrUnsupported, "request 99"},
		{"truncated payload", func(r *rawFrontend) error {
			h := binary.NativeEndian.AppendUint32(nil, uint32(vhostuser.SetFeatures))
			h = binary.NativeEndian.AppendUint32(h, v)
			h = binary.NativeEndian.AppendUint32(h, 8)
			_, err := r.c.Write(append(h, 1, 2))
			require.NoError(t, err)
			require.NoError(t, r.c.CloseWrite())
			_, err = r.b.Next()
			return err
		}, io.ErrUnexpectedEOF, "payload"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRaw(t)
			err := tc.run(r)
			require.ErrorIs(t, err, tc.is)
			require.Contains(t, err.Error(), tc.says)
			require.Empty(t, r.b.Memory().Regions())
		})
	}
	require.Equal(t, before, fdCount(t), "no descriptor the back end was sent stays open")
}

// With REPLY_ACK, a refused request is answered with a non-zero status
// that the Frontend reports as a *RejectedError.
func TestRejectedRequestIsReported(t *testing.T) {
	fc, bc := connPair(t)
	b := vhostuser.NewBackend(bc, vhostuser.BackendConfig{})
	served := make(chan error, 1)
	go func() { served <- b.Serve() }()
	f, err := vhostuser.NewFrontend(fc)
	require.NoError(t, err)
	defer f.Close()
	defer b.Close()
	fd := memfd(t, 1<<20)
	require.NoError(t, f.AddMemReg(vhostuser.MemoryRegion{GuestPhysAddr: 0, MemorySize: 1 << 20, UserspaceAddr: 1}, fd))
	err = f.AddMemReg(vhostuser.MemoryRegion{GuestPhysAddr: 4096, MemorySize: 4096, UserspaceAddr: 2}, fd)
	var re *vhostuser.RejectedError
	require.True(t, errors.As(err, &re), "%v", err)
	require.Equal(t, vhostuser.AddMemReg, re.Request)
	require.ErrorIs(t, err, vhostuser.ErrRejected)
	require.ErrorIs(t, <-served, vhostuser.ErrMalformed, "the back end ends the session")
	require.Len(t, b.Memory().Regions(), 1)
}

func fdCount(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	return len(ents)
}
