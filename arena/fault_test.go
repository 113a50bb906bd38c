package arena_test

import (
	"bytes"
	"errors"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
)

// accessor is one access method of a Mapping, applied at a page-aligned
// offset.
type accessor struct {
	name  string
	write bool // it stores (a read-only page faults it)
	call  func(t *testing.T, m *arena.Mapping, off int64) error
}

func accessors() []accessor {
	ignore := func(_ any, err error) error { return err }
	return []accessor{
		{"LoadUint32", false, func(_ *testing.T, m *arena.Mapping, o int64) error { return ignore(m.LoadUint32(o)) }},
		{"LoadUint64", false, func(_ *testing.T, m *arena.Mapping, o int64) error { return ignore(m.LoadUint64(o + 8)) }},
		{"StoreUint32", true, func(_ *testing.T, m *arena.Mapping, o int64) error { return m.StoreUint32(o+4, 1) }},
		{"StoreUint64", true, func(_ *testing.T, m *arena.Mapping, o int64) error { return m.StoreUint64(o, 1) }},
		{"CompareAndSwapUint32", true, func(_ *testing.T, m *arena.Mapping, o int64) error {
			return ignore(m.CompareAndSwapUint32(o, 0, 1)) // the page reads zeros: the swap would happen
		}},
		{"CompareAndSwapUint64", true, func(_ *testing.T, m *arena.Mapping, o int64) error {
			return ignore(m.CompareAndSwapUint64(o+16, 0, 1))
		}},
		{"ReadUint8", false, func(_ *testing.T, m *arena.Mapping, o int64) error { return ignore(m.ReadUint8(o + 1)) }},
		{"ReadUint16", false, func(_ *testing.T, m *arena.Mapping, o int64) error { return ignore(m.ReadUint16(o + 3)) }},
		{"ReadUint32", false, func(_ *testing.T, m *arena.Mapping, o int64) error { return ignore(m.ReadUint32(o + 5)) }},
		{"ReadUint64", false, func(_ *testing.T, m *arena.Mapping, o int64) error { return ignore(m.ReadUint64(o + 7)) }},
		{"WriteUint8", true, func(_ *testing.T, m *arena.Mapping, o int64) error { return m.WriteUint8(o+1, 1) }},
		{"WriteUint16", true, func(_ *testing.T, m *arena.Mapping, o int64) error { return m.WriteUint16(o+3, 1) }},
		{"WriteUint32", true, func(_ *testing.T, m *arena.Mapping, o int64) error { return m.WriteUint32(o+5, 1) }},
		{"WriteUint64", true, func(_ *testing.T, m *arena.Mapping, o int64) error { return m.WriteUint64(o+7, 1) }},
		{"ReadAt", false, func(_ *testing.T, m *arena.Mapping, o int64) error { return ignore(m.ReadAt(make([]byte, page), o)) }},
		{"WriteAt", true, func(_ *testing.T, m *arena.Mapping, o int64) error {
			return ignore(m.WriteAt(bytes.Repeat([]byte{1}, int(page)), o))
		}},
		{"CopyTo", false, func(_ *testing.T, m *arena.Mapping, o int64) error {
			var sink bytes.Buffer // reads what it is given (io.Discard does not)
			return ignore(m.CopyTo(&sink, o, page))
		}},
		{"CopyFrom", true, func(_ *testing.T, m *arena.Mapping, o int64) error {
			return ignore(m.CopyFrom(o, bytes.NewReader(make([]byte, page)), page))
		}},
		{"CopyFrom/kernel", true, func(t *testing.T, m *arena.Mapping, o int64) error {
			r, w, err := pipe(t) // the kernel copies into the mapping: EFAULT, not a signal
			require.NoError(t, err)
			_, err = w.Write(make([]byte, page))
			require.NoError(t, err)
			return ignore(m.CopyFrom(o, r, page))
		}},
	}
}

// TestFaultsAreErrorsInEveryBuild runs every accessor, the atomics included,
// into each kind of page the hardware refuses, and requires an ErrFault error
// and a process that lives on. make test runs it under -race, where the
// atomics once ran inside the race detector's C runtime and a fault there
// killed the process instead of reaching the fault recovery.
func TestFaultsAreErrorsInEveryBuild(t *testing.T) {
	for _, fc := range []struct {
		name     string
		readable bool // reads succeed; only stores fault
		setup    func(t *testing.T) (*arena.Mapping, int64)
	}{
		{"PROT_NONE", false, func(t *testing.T) (*arena.Mapping, int64) {
			m, err := arena.NewAnon(4*page, arena.Private())
			require.NoError(t, err)
			require.NoError(t, m.Protect(page, page, arena.ProtNone))
			return m, page
		}},
		{"read-only", true, func(t *testing.T) (*arena.Mapping, int64) {
			m, err := arena.NewFromFD(newMemfd(t, 4*page), 0, 4*page, arena.WithProtection(arena.ProtRead))
			require.NoError(t, err)
			return m, page
		}},
		{"read-only private anonymous", true, func(t *testing.T) (*arena.Mapping, int64) {
			m, err := arena.NewAnon(4*page, arena.Private(), arena.WithProtection(arena.ProtRead))
			require.NoError(t, err)
			return m, page
		}},
		{"truncated memfd (SIGBUS)", false, func(t *testing.T) (*arena.Mapping, int64) {
			fd := newMemfd(t, 4*page)
			m, err := arena.NewFromFD(fd, 0, 4*page)
			require.NoError(t, err)
			require.NoError(t, unix.Ftruncate(fd, page))
			return m, 2 * page
		}},
	} {
		t.Run(fc.name, func(t *testing.T) {
			m, off := fc.setup(t)
			t.Cleanup(func() { require.NoError(t, m.Close()) })
			for _, ac := range accessors() {
				t.Run(ac.name, func(t *testing.T) {
					err := ac.call(t, m, off)
					if fc.readable && !ac.write {
						require.NoError(t, err)
						return
					}
					require.ErrorIs(t, err, arena.ErrFault)
					var fe *arena.FaultError
					require.ErrorAs(t, err, &fe)
					require.GreaterOrEqual(t, fe.Offset, off, "the fault is in the page refused")
					require.Less(t, fe.Offset, off+page, "the fault is in the page refused")
					require.Zero(t, fe.Done)
				})
			}
			// The process lived on, and the mapping still works where it can.
			v, err := m.LoadUint64(0)
			require.NoError(t, err)
			require.Zero(t, v)
		})
	}
}

// TestAtomicsAreAtomic checks the atomics' semantics: full 64-bit values
// (a comparison or store of only the low half would show), a failed compare
// that leaves memory alone, and compare-and-swap increments from many
// goroutines at once that lose no update.
func TestAtomicsAreAtomic(t *testing.T) {
	m, err := arena.NewAnon(page)
	require.NoError(t, err)
	defer m.Close()

	const hi = 0xA5A5_0000_0000_0000
	require.NoError(t, m.StoreUint64(8, hi|5))
	for _, tc := range []struct {
		old, newV, want uint64
		swapped         bool
	}{
		{5, 9, hi | 5, false},      // the low halves match, the high ones do not
		{hi | 4, 9, hi | 5, false}, // the high halves match, the low ones do not
		{hi | 5, 1<<63 | 7, 1<<63 | 7, true},
	} {
		ok, err := m.CompareAndSwapUint64(8, tc.old, tc.newV)
		require.NoError(t, err)
		require.Equal(t, tc.swapped, ok, "CompareAndSwapUint64(%#x, %#x)", tc.old, tc.newV)
		v, err := m.LoadUint64(8)
		require.NoError(t, err)
		require.Equal(t, tc.want, v)
	}
	require.NoError(t, m.StoreUint32(16, 0xFFFF_FFFF))
	require.NoError(t, m.StoreUint32(20, 0x1234_5678))
	ok, err := m.CompareAndSwapUint32(16, 0xFFFF_FFFF, 2)
	require.NoError(t, err)
	require.True(t, ok)
	v, err := m.LoadUint64(16)
	require.NoError(t, err)
	require.Equal(t, uint64(0x1234_5678_0000_0002), v, "a 32-bit store touches 4 bytes only")

	const workers, rounds = 8, 2000
	// increment adds delta to the word at off with a compare-and-swap loop.
	increment := func(off int64, delta uint64) error {
		for {
			var ok bool
			var err error
			if off%8 == 0 {
				var v uint64
				if v, err = m.LoadUint64(off); err == nil {
					ok, err = m.CompareAndSwapUint64(off, v, v+delta)
				}
			} else {
				var v uint32
				if v, err = m.LoadUint32(off); err == nil {
					ok, err = m.CompareAndSwapUint32(off, v, v+uint32(delta))
				}
			}
			if err != nil || ok {
				return err
			}
		}
	}
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for range rounds {
				if errs[w] = errors.Join(increment(68, 1), increment(128, 1<<32)); errs[w] != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	require.NoError(t, errors.Join(errs...))
	v32, err := m.LoadUint32(68)
	require.NoError(t, err)
	require.Equal(t, uint32(workers*rounds), v32)
	v64, err := m.LoadUint64(128)
	require.NoError(t, err)
	require.Equal(t, uint64(workers*rounds)<<32, v64)
}
