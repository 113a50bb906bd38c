package arena_test

import (
	"bytes"
	"io"
	"math"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
)

// method adapts one arena method to a common (offset, length) shape.
type method struct {
	name string
	kind methodKind
	call func(a *arena.Arena, off, n int64) error
}

type methodKind int

const (
	pageOp    methodKind = iota // page-granular; the range must be mapped
	pageQuery                   // page-granular; reserved ranges are fine
	addOp                       // maps into the arena
	byteOp                      // byte-granular access
	wordOp                      // fixed-size little-endian access at off; n is ignored
	atomicOp                    // atomic access: off must be naturally aligned
)

func methods(memfd int) []method {
	ignore := func(_ any, err error) error { return err }
	return []method{
		{"Prefetch", pageOp, func(a *arena.Arena, o, n int64) error { return a.Prefetch(o, n) }},
		{"DropPageCache", pageOp, func(a *arena.Arena, o, n int64) error { return a.DropPageCache(o, n) }},
		{"RemoveRange", pageOp, func(a *arena.Arena, o, n int64) error { return a.RemoveRange(o, n) }},
		{"LockOnFault", pageOp, func(a *arena.Arena, o, n int64) error { return a.LockOnFault(o, n) }},
		{"Unlock", pageOp, func(a *arena.Arena, o, n int64) error { return a.Unlock(o, n) }},
		{"UseHugepages", pageOp, func(a *arena.Arena, o, n int64) error { return a.UseHugepages(o, n) }},
		{"NoHugepages", pageOp, func(a *arena.Arena, o, n int64) error { return a.NoHugepages(o, n) }},
		{"UseDontfork", pageOp, func(a *arena.Arena, o, n int64) error { return a.UseDontfork(o, n) }},
		{"Msync", pageOp, func(a *arena.Arena, o, n int64) error { return a.Msync(o, n) }},
		{"Populate", pageOp, func(a *arena.Arena, o, n int64) error { return a.Populate(o, n, arena.PopulateWrite) }},
		{"Protect", pageOp, func(a *arena.Arena, o, n int64) error { return a.Protect(o, n, arena.ProtReadWrite) }},
		{"RemoveMapping", pageOp, func(a *arena.Arena, o, n int64) error { return a.RemoveMapping(o, n) }},
		{"Resident", pageQuery, func(a *arena.Arena, o, n int64) error { return ignore(a.Resident(o, n)) }},
		{"StatsRange", pageQuery, func(a *arena.Arena, o, n int64) error { return ignore(a.StatsRange(o, n)) }},
		{"AddAnonMapping", addOp, func(a *arena.Arena, o, n int64) error {
			return a.AddAnonMapping(o, n, arena.ProtReadWrite, arena.Replace())
		}},
		{"AddFDMapping", addOp, func(a *arena.Arena, o, n int64) error {
			return a.AddFDMapping(o, n, memfd, 0, arena.ProtReadWrite, arena.Replace())
		}},
		{"ReadAt", byteOp, func(a *arena.Arena, o, n int64) error {
			return ignore(a.ReadAt(make([]byte, max(n, 0)), o))
		}},
		{"WriteAt", byteOp, func(a *arena.Arena, o, n int64) error {
			return ignore(a.WriteAt(make([]byte, max(n, 0)), o))
		}},
		{"CopyFrom", byteOp, func(a *arena.Arena, o, n int64) error {
			return ignore(a.CopyFrom(o, bytes.NewReader(make([]byte, max(n, 0))), n))
		}},
		{"CopyTo", byteOp, func(a *arena.Arena, o, n int64) error { return ignore(a.CopyTo(io.Discard, o, n)) }},
		{"ReadUint64", wordOp, func(a *arena.Arena, o, _ int64) error { return ignore(a.ReadUint64(o)) }},
		{"WriteUint32", wordOp, func(a *arena.Arena, o, _ int64) error { return a.WriteUint32(o, 1) }},
		{"LoadUint64", atomicOp, func(a *arena.Arena, o, _ int64) error { return ignore(a.LoadUint64(o)) }},
		{"StoreUint32", atomicOp, func(a *arena.Arena, o, _ int64) error { return a.StoreUint32(o, 1) }},
		{"CompareAndSwapUint64", atomicOp, func(a *arena.Arena, o, _ int64) error {
			return ignore(a.CompareAndSwapUint64(o, 0, 1))
		}},
	}
}

// TestEveryMethodRejectsBadRanges walks every bad-range case through every
// method of an arena whose first half is mapped and second half reserved.
func TestEveryMethodRejectsBadRanges(t *testing.T) {
	const pages = 16
	size := pages * page
	aligned := (math.MaxInt64 / page) * page
	type want map[methodKind]error // nil: must succeed
	cases := []struct {
		name   string
		off, n int64
		closed bool
		want   want
	}{
		{"zero size", 0, 0, false, want{pageOp: arena.ErrZeroSize, pageQuery: arena.ErrZeroSize, addOp: arena.ErrZeroSize,
			byteOp: nil /* io convention: an empty read or write is a no-op */, wordOp: nil, atomicOp: nil}},
		{"unaligned offset", 1, page, false, want{pageOp: arena.ErrUnaligned, pageQuery: arena.ErrUnaligned,
			addOp: arena.ErrUnaligned, byteOp: nil, wordOp: nil, atomicOp: arena.ErrUnaligned}},
		{"unaligned size", 0, page + 1, false, want{pageOp: arena.ErrUnaligned, pageQuery: arena.ErrUnaligned,
			addOp: arena.ErrUnaligned, byteOp: nil, wordOp: nil, atomicOp: nil}},
		{"overflow", aligned, 2 * page, false, want{pageOp: arena.ErrOverflow, pageQuery: arena.ErrOverflow,
			addOp: arena.ErrOverflow, byteOp: arena.ErrOverflow, wordOp: arena.ErrOutOfRange, atomicOp: arena.ErrOutOfRange}},
		{"negative offset", -page, page, false, want{pageOp: arena.ErrOutOfRange, pageQuery: arena.ErrOutOfRange,
			addOp: arena.ErrOutOfRange, byteOp: arena.ErrOutOfRange, wordOp: arena.ErrOutOfRange, atomicOp: arena.ErrOutOfRange}},
		{"past the end", size - page, 2 * page, false, want{pageOp: arena.ErrOutOfRange, pageQuery: arena.ErrOutOfRange,
			addOp: arena.ErrOutOfRange, byteOp: arena.ErrOutOfRange, wordOp: arena.ErrNotMapped, atomicOp: arena.ErrNotMapped}},
		{"reserved range", 10 * page, 2 * page, false, want{pageOp: arena.ErrNotMapped, pageQuery: nil,
			addOp: nil, byteOp: arena.ErrNotMapped, wordOp: arena.ErrNotMapped, atomicOp: arena.ErrNotMapped}},
		{"closed", 0, page, true, want{pageOp: arena.ErrClosed, pageQuery: arena.ErrClosed,
			addOp: arena.ErrClosed, byteOp: arena.ErrClosed, wordOp: arena.ErrClosed, atomicOp: arena.ErrClosed}},
	}
	memfd := newMemfd(t, size)
	for _, m := range methods(memfd) {
		for _, c := range cases {
			t.Run(m.name+"/"+c.name, func(t *testing.T) {
				a, err := arena.New(size)
				require.NoError(t, err)
				defer a.Close()
				require.NoError(t, a.AddAnonMapping(0, size/2, arena.ProtReadWrite))
				if c.closed {
					require.NoError(t, a.Close())
				}
				want := c.want[m.kind]
				if m.name == "ReadAt" && c.name == "past the end" {
					// The arena's last page is reserved: the read meets that
					// before the end (io.EOF at the end is tested elsewhere).
					want = arena.ErrNotMapped
				}
				if m.name == "RemoveRange" && want == nil {
					want = arena.ErrNotShared
				}
				err = m.call(a, c.off, c.n)
				if want == nil {
					require.NoError(t, err)
					return
				}
				require.ErrorIs(t, err, want)
				if want == arena.ErrNotMapped && m.kind >= byteOp {
					require.ErrorIs(t, err, arena.ErrFault, "an access to reserved memory is a fault")
				}
			})
		}
	}
}

func TestMappingArgumentsAreValidated(t *testing.T) {
	memfd := newMemfd(t, 16*page)
	a := newArena(t, 16*page)
	require.NoError(t, a.AddAnonMapping(0, 4*page, arena.ProtRead))
	const closedFD = 1 << 20 // far above any open fd: EBADF, and never reused by another test's fd
	r, _, err := pipe(t)
	require.NoError(t, err)
	roFD, err := unix.Open("/proc/self/exe", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	require.NoError(t, err)
	defer unix.Close(roFD)
	for _, tc := range []struct {
		name string
		err  error
		call func() error
	}{
		{"overlap", arena.ErrOverlap, func() error { return a.AddAnonMapping(2*page, 4*page, arena.ProtRead) }},
		{"overlap fd", arena.ErrOverlap, func() error { return a.AddFDMapping(3*page, page, memfd, 0, arena.ProtRead) }},
		{"unaligned fd offset", arena.ErrUnaligned, func() error { return a.AddFDMapping(8*page, page, memfd, 100, arena.ProtRead) }},
		{"fd offset overflow", arena.ErrOverflow, func() error {
			return a.AddFDMapping(8*page, 2*page, memfd, (math.MaxInt64/page)*page, arena.ProtRead)
		}},
		{"negative fd", arena.ErrBadFD, func() error { return a.AddFDMapping(8*page, page, -1, 0, arena.ProtRead) }},
		{"closed fd", arena.ErrBadFD, func() error { return a.AddFDMapping(8*page, page, closedFD, 0, arena.ProtRead) }},
		{"unmappable fd", arena.ErrBadFD, func() error { return a.AddFDMapping(8*page, page, int(r.Fd()), 0, arena.ProtRead) }},
		{"read-only fd mapped shared writable", arena.ErrBadFD, func() error {
			return a.AddFDMapping(8*page, page, roFD, 0, arena.ProtReadWrite)
		}},
		{"pipe for constructor", arena.ErrBadFD, func() error {
			_, err := arena.NewFromFD(int(r.Fd()), 0, page, arena.WithProtection(arena.ProtRead))
			return err
		}},
		{"bad protection", arena.ErrBadProtection, func() error { return a.AddAnonMapping(8*page, page, arena.Protection(0x80)) }},
		{"Align on add", arena.ErrBadOption, func() error { return a.AddAnonMapping(8*page, page, arena.ProtRead, arena.Align(page)) }},
		{"Replace on constructor", arena.ErrBadOption, func() error { _, err := arena.NewAnon(page, arena.Replace()); return err }},
		{"constructor zero size", arena.ErrZeroSize, func() error { _, err := arena.NewAnon(0); return err }},
		{"constructor unaligned", arena.ErrUnaligned, func() error { _, err := arena.NewAnon(page + 1); return err }},
		{"constructor negative", arena.ErrOutOfRange, func() error { _, err := arena.NewAnon(-page); return err }},
		{"constructor bad fd", arena.ErrBadFD, func() error { _, err := arena.NewFromFD(closedFD, 0, page); return err }},
		{"constructor bad prot", arena.ErrBadProtection, func() error {
			_, err := arena.NewAnon(page, arena.WithProtection(arena.Protection(-1)))
			return err
		}},
		{"arena zero size", arena.ErrZeroSize, func() error { _, err := arena.New(0); return err }},
		{"arena bad align", arena.ErrBadAlignment, func() error { _, err := arena.New(page, arena.ArenaAlign(page+1)); return err }},
		{"populate mode", arena.ErrBadOption, func() error { return a.Populate(0, page, arena.PopulateMode(9)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.ErrorIs(t, tc.call(), tc.err)
		})
	}
	require.Len(t, a.Mappings(), 1, "no rejected call changed the arena")
}

func TestSyscallErrorsKeepTheirName(t *testing.T) {
	// Write-populating a read-only shared file mapping is refused by the
	// kernel; the error names the call and keeps the errno.
	fd := newMemfd(t, 4*page)
	m, err := arena.NewFromFD(fd, 0, 4*page, arena.WithProtection(arena.ProtRead))
	require.NoError(t, err)
	defer m.Close()
	err = m.Populate(0, 4*page, arena.PopulateWrite)
	require.Error(t, err)
	require.Contains(t, err.Error(), "madvise(MADV_POPULATE_WRITE)")
}
