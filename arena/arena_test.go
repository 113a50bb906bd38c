package arena_test

import (
	"bytes"
	"errors"
	"io"
	"math"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
)

func newArena(t testing.TB, size int64, opts ...arena.ArenaOption) *arena.Arena {
	t.Helper()
	a, err := arena.New(size, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, a.Close()) })
	return a
}

func TestNewReservesAlignedNoneWithoutMemory(t *testing.T) {
	a := newArena(t, 1<<40) // a terabyte of address space costs nothing
	require.Zero(t, a.Addr()%arena.DefaultArenaAlign)
	require.Equal(t, "---p", mapsPerms(t, a.Addr()))
	st, err := a.StatsRange(0, 1<<30)
	require.NoError(t, err)
	require.Zero(t, st.Rss)
	require.True(t, st.HasFlag("dd"))
	require.Empty(t, a.Mappings())

	ro := newArena(t, 16*page, arena.ReadOnlyReservation())
	require.Equal(t, "r--p", mapsPerms(t, ro.Addr()))
	require.Equal(t, arena.ProtRead, ro.ReservationProtection())
}

func TestAddFDMappingSharesDataWithFD(t *testing.T) {
	a := newArena(t, 64<<20)
	fd := newMemfd(t, 16<<20)
	require.NoError(t, a.AddFDMapping(4<<20, 8<<20, fd, 2<<20, arena.ProtReadWrite))
	_, err := a.WriteAt([]byte("through the arena"), 4<<20+100)
	require.NoError(t, err)
	got := make([]byte, 17)
	_, err = unix.Pread(fd, got, 2<<20+100)
	require.NoError(t, err)
	require.Equal(t, "through the arena", string(got))

	_, err = unix.Pwrite(fd, []byte("through the fd"), 2<<20+8192)
	require.NoError(t, err)
	got = make([]byte, 14)
	_, err = a.ReadAt(got, 4<<20+8192)
	require.NoError(t, err)
	require.Equal(t, "through the fd", string(got))

	var st unix.Stat_t
	require.NoError(t, unix.Fstat(fd, &st))
	require.Equal(t, []arena.MappingInfo{{
		Offset: 4 << 20, Size: 8 << 20, Prot: arena.ProtReadWrite, Shared: true, PageSize: page,
		FD: fd, FDOffset: 2 << 20, Dev: st.Dev, Ino: st.Ino,
	}}, a.Mappings())
	require.Equal(t, "rw-s", mapsPerms(t, a.Addr()+4<<20))
}

func TestRemoveMappingRestoresReservationAndFreesPages(t *testing.T) {
	for _, tc := range []struct {
		name  string
		opts  []arena.ArenaOption
		perms string
	}{
		{"none", nil, "---p"},
		{"read-only", []arena.ArenaOption{arena.ReadOnlyReservation()}, "r--p"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const size = 8 << 20
			a := newArena(t, 32<<20, tc.opts...)
			require.NoError(t, a.AddAnonMapping(2<<20, size, arena.ProtReadWrite, arena.Private()))
			_, err := a.WriteAt(bytes.Repeat([]byte{1}, size), 2<<20)
			require.NoError(t, err)
			require.Equal(t, int64(size), stats(t, a, 2<<20, size).Rss)

			// Remove the middle: the mapping splits in two.
			require.NoError(t, a.RemoveMapping(4<<20, 2<<20))
			require.Equal(t, tc.perms, mapsPerms(t, a.Addr()+4<<20))
			require.Equal(t, int64(size-2<<20), stats(t, a, 2<<20, size).Rss)
			require.Equal(t, []arena.MappingInfo{
				{Offset: 2 << 20, Size: 2 << 20, Prot: arena.ProtReadWrite, Anonymous: true, PageSize: page, FD: -1},
				{Offset: 6 << 20, Size: 4 << 20, Prot: arena.ProtReadWrite, Anonymous: true, PageSize: page, FD: -1},
			}, a.Mappings())
			_, err = a.ReadAt(make([]byte, 8), 4<<20)
			require.ErrorIs(t, err, arena.ErrFault)
			require.ErrorIs(t, err, arena.ErrNotMapped)
			require.ErrorIs(t, a.RemoveMapping(4<<20, 2<<20), arena.ErrNotMapped, "removing reserved space is a mistake")

			// The removed range can be mapped again, and reads fresh memory.
			require.NoError(t, a.AddAnonMapping(4<<20, 2<<20, arena.ProtReadWrite, arena.Private()))
			v, err := a.ReadUint64(4 << 20)
			require.NoError(t, err)
			require.Zero(t, v)
			v, err = a.ReadUint64(6 << 20)
			require.NoError(t, err)
			require.Equal(t, uint64(0x0101010101010101), v)
		})
	}
}

func TestOverlapIsRejectedUnlessReplace(t *testing.T) {
	a := newArena(t, 16<<20)
	fd := newMemfd(t, 4<<20)
	require.NoError(t, a.AddAnonMapping(0, 4<<20, arena.ProtReadWrite))
	require.NoError(t, a.WriteUint32(1<<20, 0xfeed))

	err := a.AddFDMapping(2<<20, 4<<20, fd, 0, arena.ProtRead)
	require.ErrorIs(t, err, arena.ErrOverlap)
	var re *arena.RangeError
	require.ErrorAs(t, err, &re)
	require.Equal(t, "AddFDMapping", re.Op)
	v, err := a.ReadUint32(1 << 20)
	require.NoError(t, err)
	require.Equal(t, uint32(0xfeed), v, "a rejected add leaves the old mapping intact")

	require.NoError(t, a.AddFDMapping(2<<20, 4<<20, fd, 0, arena.ProtRead, arena.Replace()))
	infos := a.Mappings()
	require.Len(t, infos, 2)
	require.Equal(t, int64(2<<20), infos[0].Size, "the old mapping was cut back")
	require.Equal(t, arena.ProtRead, infos[1].Prot)
	require.Equal(t, "r--s", mapsPerms(t, a.Addr()+2<<20))
}

func TestProtectUpdatesKernelAndTable(t *testing.T) {
	a := newArena(t, 16<<20)
	require.NoError(t, a.AddAnonMapping(0, 8*page, arena.ProtReadWrite, arena.Private()))
	require.NoError(t, a.Protect(2*page, 2*page, arena.ProtRead))
	require.Equal(t, "r--p", mapsPerms(t, a.Addr()+2*uintptr(page)))
	require.Equal(t, "rw-p", mapsPerms(t, a.Addr()+4*uintptr(page)))
	require.Len(t, a.Mappings(), 3)

	_, err := a.WriteAt([]byte{1}, 2*page)
	require.ErrorIs(t, err, arena.ErrFault, "writing a read-only page faults and is caught")
	require.ErrorIs(t, a.Protect(8*page, page, arena.ProtRead), arena.ErrNotMapped)
	require.ErrorIs(t, a.Protect(0, page, arena.Protection(0x100)), arena.ErrBadProtection)
}

func TestFromMappingMakesAnArena(t *testing.T) {
	m, err := arena.NewAnon(8*page, arena.Private())
	require.NoError(t, err)
	a := arena.FromMapping(m)
	defer a.Close()
	require.NoError(t, a.RemoveMapping(2*page, 2*page))
	require.Equal(t, "---p", mapsPerms(t, a.Addr()+2*uintptr(page)))
	require.NoError(t, a.AddAnonMapping(2*page, page, arena.ProtRead))
	require.Len(t, a.Mappings(), 3, "[0,2) private, [2,3) new, [4,8) private; page 3 reserved")
}

func TestAccessFaultsBecomeErrors(t *testing.T) {
	t.Run("reserved range", func(t *testing.T) {
		a := newArena(t, 8<<20)
		require.NoError(t, a.AddAnonMapping(0, 2<<20, arena.ProtReadWrite))
		n, err := a.ReadAt(make([]byte, 3<<20), 0)
		require.Zero(t, n, "nothing is read when part of the range is reserved")
		var fe *arena.FaultError
		require.ErrorAs(t, err, &fe)
		require.Equal(t, int64(2<<20), fe.Offset, "the error names the first unmapped byte")
		require.ErrorIs(t, err, arena.ErrNotMapped)
		_, err = a.LoadUint64(4 << 20)
		require.ErrorIs(t, err, arena.ErrFault)
	})
	t.Run("PROT_NONE", func(t *testing.T) {
		m, err := arena.NewAnon(4*page, arena.Private())
		require.NoError(t, err)
		defer m.Close()
		require.NoError(t, m.Protect(2*page, page, arena.ProtNone))
		n, err := m.WriteAt(bytes.Repeat([]byte{5}, int(4*page)), 0)
		require.ErrorIs(t, err, arena.ErrFault)
		require.Equal(t, int(2*page), n, "exactly the bytes before the faulting page were written")
		v, err := m.ReadUint8(2*page - 1)
		require.NoError(t, err)
		require.Equal(t, uint8(5), v)
		_, err = m.CompareAndSwapUint32(2*page, 0, 1)
		require.ErrorIs(t, err, arena.ErrFault)
	})
	t.Run("truncated file (SIGBUS)", func(t *testing.T) {
		fd := newMemfd(t, 8*page)
		m, err := arena.NewFromFD(fd, 0, 8*page)
		require.NoError(t, err)
		defer m.Close()
		require.NoError(t, unix.Ftruncate(fd, 3*page))
		buf := make([]byte, 8*page)
		n, err := m.ReadAt(buf, 0)
		require.ErrorIs(t, err, arena.ErrFault)
		require.Equal(t, int(3*page), n)
		var sink bytes.Buffer // a writer that reads what it is given (io.Discard does not)
		n64, err := m.CopyTo(&sink, 0, 8*page)
		require.ErrorIs(t, err, arena.ErrFault)
		require.Zero(t, n64)
		// A kernel copy into the truncated part is EFAULT, reported the same way.
		r, w, err := pipe(t)
		require.NoError(t, err)
		_, err = w.Write(make([]byte, page))
		require.NoError(t, err)
		_, err = m.CopyFrom(4*page, r, page)
		require.ErrorIs(t, err, arena.ErrFault)
		require.ErrorIs(t, m.Populate(0, 8*page, arena.PopulateWrite), arena.ErrFault)
	})
}

func TestTypedAndAtomicAccess(t *testing.T) {
	m, err := arena.NewAnon(2 * page)
	require.NoError(t, err)
	defer m.Close()
	require.NoError(t, m.WriteUint16(10, 0xBEEF))
	require.NoError(t, m.WriteUint32(12, 0xDEADBEEF))
	require.NoError(t, m.WriteUint64(16, 0x0102030405060708))
	require.NoError(t, m.WriteUint8(24, 0x7f))
	raw := make([]byte, 15)
	_, err = m.ReadAt(raw, 10)
	require.NoError(t, err)
	require.Equal(t, []byte{0xEF, 0xBE, 0xEF, 0xBE, 0xAD, 0xDE, 8, 7, 6, 5, 4, 3, 2, 1, 0x7f}, raw, "little-endian")
	v16, _ := m.ReadUint16(10)
	v32, _ := m.ReadUint32(12)
	v64, _ := m.ReadUint64(16)
	v8, _ := m.ReadUint8(24)
	require.Equal(t, []uint64{0xBEEF, 0xDEADBEEF, 0x0102030405060708, 0x7f}, []uint64{uint64(v16), uint64(v32), v64, uint64(v8)})
	// Unaligned little-endian accesses are fine; unaligned atomics are not.
	require.NoError(t, m.WriteUint64(page-3, math.MaxUint64))

	require.NoError(t, m.StoreUint32(32, 1))
	ok, err := m.CompareAndSwapUint32(32, 1, 2)
	require.NoError(t, err)
	require.True(t, ok)
	ok, err = m.CompareAndSwapUint32(32, 1, 3)
	require.NoError(t, err)
	require.False(t, ok)
	v32, err = m.LoadUint32(32)
	require.NoError(t, err)
	require.Equal(t, uint32(2), v32)
	require.NoError(t, m.StoreUint64(40, 7))
	ok, err = m.CompareAndSwapUint64(40, 7, 8)
	require.NoError(t, err)
	require.True(t, ok)
	v64, err = m.LoadUint64(40)
	require.NoError(t, err)
	require.Equal(t, uint64(8), v64)
	_, err = m.LoadUint64(44)
	require.ErrorIs(t, err, arena.ErrUnaligned)
	_, err = m.CompareAndSwapUint32(2, 0, 1)
	require.ErrorIs(t, err, arena.ErrUnaligned)
}

func TestReaderAtWriterAtAndStreams(t *testing.T) {
	m, err := arena.NewAnon(4 * page)
	require.NoError(t, err)
	defer m.Close()
	var _ io.ReaderAt = m
	var _ io.WriterAt = m

	data := bytes.Repeat([]byte("0123456789abcdef"), int(page)/4) // 4 pages
	n, err := m.CopyFrom(0, bytes.NewReader(data), int64(len(data)))
	require.NoError(t, err)
	require.Equal(t, int64(len(data)), n)
	var out bytes.Buffer
	n, err = m.CopyTo(&out, 0, 4*page)
	require.NoError(t, err)
	require.Equal(t, 4*page, n)
	require.Equal(t, data, out.Bytes())

	// io.SectionReader works on top of ReadAt, including its EOF rules.
	all, err := io.ReadAll(io.NewSectionReader(m, page, 3*page))
	require.NoError(t, err)
	require.Equal(t, data[page:], all)
	n2, err := m.ReadAt(make([]byte, 10), 4*page-4)
	require.Equal(t, 4, n2)
	require.ErrorIs(t, err, io.EOF)
	_, err = m.ReadAt(make([]byte, 1), 4*page)
	require.ErrorIs(t, err, io.EOF)
	_, err = m.ReadAt(make([]byte, 1), 4*page+1)
	require.ErrorIs(t, err, arena.ErrOutOfRange)
	_, err = m.WriteAt(make([]byte, 10), 4*page-4)
	require.ErrorIs(t, err, arena.ErrOutOfRange)

	n, err = m.CopyFrom(0, bytes.NewReader([]byte("short")), 100)
	require.ErrorIs(t, err, io.ErrUnexpectedEOF)
	require.Equal(t, int64(5), n)
	n, err = m.CopyFrom(0, bytes.NewReader(nil), 0)
	require.NoError(t, err)
	require.Zero(t, n)
	_, err = m.CopyTo(failingWriter{}, 0, page)
	require.ErrorIs(t, err, errWrite)
}

var errWrite = errors.New("write refused")

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errWrite }

func TestBytesAliasesTheMapping(t *testing.T) {
	a := newArena(t, 16*page)
	require.NoError(t, a.AddAnonMapping(0, 4*page, arena.ProtReadWrite))
	b, err := a.Bytes(page, 2*page)
	require.NoError(t, err)
	require.Len(t, b, int(2*page))
	b[5] = 42
	v, err := a.ReadUint8(page + 5)
	require.NoError(t, err)
	require.Equal(t, uint8(42), v)
	_, err = a.Bytes(3*page, 2*page)
	require.ErrorIs(t, err, arena.ErrNotMapped)
	_, err = a.Bytes(0, 0)
	require.ErrorIs(t, err, arena.ErrZeroSize)
}
