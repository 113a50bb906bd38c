package guestmem_test

import (
	"bytes"
	"io"
	"math"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/guestmem"
)

func TestAccessSpansContiguousRegions(t *testing.T) {
	m := newMemory(t, twoRegions, guestmem.WithMemfd())
	data := bytes.Repeat([]byte("0123456789"), mib/5) // 2 MiB
	n, err := m.WriteAt(data, 3*mib)                  // [3 MiB, 5 MiB) crosses the boundary at 4 MiB
	require.NoError(t, err)
	require.Equal(t, len(data), n)
	got := make([]byte, len(data))
	n, err = m.ReadAt(got, 3*mib)
	require.NoError(t, err)
	require.Equal(t, len(data), n)
	require.Equal(t, data, got)

	var out bytes.Buffer
	k, err := m.CopyTo(&out, 3*mib, uint64(len(data)))
	require.NoError(t, err)
	require.Equal(t, int64(len(data)), k)
	require.Equal(t, data, out.Bytes())
	k, err = m.CopyFrom(5*mib, bytes.NewReader(data[:mib]), mib)
	require.NoError(t, err)
	require.Equal(t, int64(mib), k)
}

func TestAccessOutsideRAMTouchesNothing(t *testing.T) {
	m := newMemory(t, twoRegions)
	require.NoError(t, m.WriteUint64(6*mib-8, 0x1111))
	for _, tc := range []struct {
		name string
		off  int64
		n    int
		bad  guestmem.GuestAddress
		err  error
	}{
		{"into the hole", 6*mib - 8, 16, 6 * mib, guestmem.ErrHole},
		{"in the hole", 8 * mib, 1, 8 * mib, guestmem.ErrHole},
		{"past the end", 18*mib - 1, 2, 18 * mib, guestmem.ErrHole},
		{"negative", -1, 1, guestmem.GuestAddress(math.MaxUint64), guestmem.ErrHole},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := m.WriteAt(bytes.Repeat([]byte{0xff}, tc.n), tc.off)
			require.Zero(t, n)
			require.ErrorIs(t, err, tc.err)
			var ae *guestmem.AddressError
			require.ErrorAs(t, err, &ae)
			require.Equal(t, tc.bad, ae.GPA, "the error names the first address outside RAM")
			_, err = m.ReadAt(make([]byte, tc.n), tc.off)
			require.ErrorIs(t, err, tc.err)
		})
	}
	v, err := m.ReadUint64(6*mib - 8)
	require.NoError(t, err)
	require.Equal(t, uint64(0x1111), v, "a rejected write wrote nothing")

	_, err = m.CopyTo(io.Discard, math.MaxUint64-4, 8)
	require.ErrorIs(t, err, guestmem.ErrAddressOverflow)
	_, err = m.Region(7 * mib)
	require.ErrorIs(t, err, guestmem.ErrHole)
	_, err = m.HostAddress(20 * mib)
	require.ErrorIs(t, err, guestmem.ErrHole)
}

func TestTypedAtomicAndSlice(t *testing.T) {
	m := newMemory(t, twoRegions)
	type header struct {
		Magic   uint32
		Version uint16
		Flags   uint16
		Addr    uint64
	}
	in := header{Magic: 0x464c457f, Version: 2, Flags: 0x8001, Addr: 0xdeadbeef00}
	require.NoError(t, m.WriteValue(16*mib+64, in))
	var out header
	require.NoError(t, m.ReadValue(16*mib+64, &out))
	require.Equal(t, in, out)
	raw := make([]byte, 4)
	_, err := m.ReadAt(raw, 16*mib+64)
	require.NoError(t, err)
	require.Equal(t, []byte{0x7f, 'E', 'L', 'F'}, raw, "little-endian")
	require.Error(t, m.ReadValue(0, new(string)), "not a fixed-size value")

	require.NoError(t, m.StoreUint64(4*mib, 5))
	ok, err := m.CompareAndSwapUint64(4*mib, 5, 6)
	require.NoError(t, err)
	require.True(t, ok)
	v, err := m.LoadUint64(4 * mib)
	require.NoError(t, err)
	require.Equal(t, uint64(6), v)
	require.NoError(t, m.StoreUint32(8, 9))
	ok, err = m.CompareAndSwapUint32(8, 8, 1)
	require.NoError(t, err)
	require.False(t, ok)
	v32, err := m.LoadUint32(8)
	require.NoError(t, err)
	require.Equal(t, uint32(9), v32)
	_, err = m.LoadUint64(4*mib - 4)
	require.ErrorIs(t, err, guestmem.ErrSpansRegions)
	_, err = m.LoadUint64(12)
	require.ErrorIs(t, err, arena.ErrUnaligned)

	s, err := m.Slice(16*mib, 4096)
	require.NoError(t, err)
	s[100] = 0xAB
	var b uint8
	require.NoError(t, m.ReadValue(16*mib+100, &b))
	require.Equal(t, uint8(0xAB), b, "the slice aliases guest memory")
	_, err = m.Slice(4*mib-8, 16)
	require.ErrorIs(t, err, guestmem.ErrSpansRegions)
	// An empty range inside a region is an empty slice (vm-memory's
	// get_slice(addr, 0)); at a hole it is still ErrHole.
	for _, a := range []guestmem.GuestAddress{0, 4*mib - 1, 4 * mib, 16 * mib} {
		s, err := m.Slice(a, 0)
		require.NoError(t, err, "Slice(%v, 0)", a)
		require.NotNil(t, s)
		require.Empty(t, s)
	}
	_, err = m.Slice(8*mib, 0)
	require.ErrorIs(t, err, guestmem.ErrHole)

	r, err := m.Region(5 * mib)
	require.NoError(t, err)
	require.Equal(t, guestmem.GuestAddress(4*mib), r.GPA)
	ha, err := m.HostAddress(5*mib + 3)
	require.NoError(t, err)
	require.Equal(t, r.HostAddr+mib+3, ha)
}

func TestConcurrentAccess(t *testing.T) {
	m := newMemory(t, twoRegions, guestmem.WithMemfd())
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			base := guestmem.GuestAddress(w) * mib
			for i := uint64(0); i < 200; i++ {
				if _, err := m.CompareAndSwapUint64(16*mib+guestmem.GuestAddress(8*w), i, i+1); err != nil {
					t.Error(err)
					return
				}
				if err := m.WriteUint64(base+guestmem.GuestAddress(i*8), i); err != nil {
					t.Error(err)
					return
				}
				if v, err := m.ReadUint64(base + guestmem.GuestAddress(i*8)); err != nil || v != i {
					t.Errorf("read %d, %v", v, err)
					return
				}
			}
		}(w)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 20; i++ {
			if _, err := m.Stats(); err != nil {
				t.Error(err)
			}
		}
	}()
	wg.Wait()
}

// FuzzAccessStaysInGuestRAM throws (address, length) pairs at a random
// layout and checks every access against a shadow copy of guest RAM: an
// access succeeds exactly when its whole range is RAM, a rejected write
// changes nothing, and no access ever touches memory outside guest RAM (the
// guard gaps around every region would turn that into a fault, which the
// model does not allow).
func FuzzAccessStaysInGuestRAM(f *testing.F) {
	f.Add(uint64(1), []byte{0, 0, 0, 16, 1, 255, 255, 255, 255, 255, 255, 255, 255, 9})
	f.Add(uint64(7), []byte{1, 0, 0, 0, 200, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, seed uint64, ops []byte) {
		rng := rand.New(rand.NewPCG(seed, seed>>32))
		// A random layout of up to 4 small regions, some contiguous.
		var l guestmem.Layout
		gpa := guestmem.GuestAddress(rng.IntN(4)) * 4096
		for i := 0; i < 1+rng.IntN(4); i++ {
			size := uint64(1+rng.IntN(4)) * 4096
			l = append(l, guestmem.RegionSpec{GPA: gpa, Size: size})
			gpa += guestmem.GuestAddress(size) + guestmem.GuestAddress(rng.IntN(2))*4096*guestmem.GuestAddress(rng.IntN(3))
		}
		m, err := guestmem.New(l)
		require.NoError(t, err)
		defer m.Close()
		top := uint64(gpa) + 8192
		shadow := map[guestmem.GuestAddress]byte{}
		inRAM := func(a guestmem.GuestAddress) bool {
			for _, r := range l {
				if a >= r.GPA && a < r.End() {
					return true
				}
			}
			return false
		}
		for len(ops) >= 6 {
			write := ops[0]&1 == 1
			var addr uint64
			if ops[0]&2 != 0 { // an adversarial, possibly huge, address
				addr = math.MaxUint64 - uint64(ops[1])
			} else {
				addr = (uint64(ops[1])<<8 | uint64(ops[2])) % top
			}
			n := int(uint64(ops[3])<<4|uint64(ops[4]&15)) % 9000
			val := ops[5]
			ops = ops[6:]

			ok := n == 0 || (addr <= math.MaxUint64-uint64(n))
			for i := 0; ok && i < n; i++ {
				ok = inRAM(guestmem.GuestAddress(addr + uint64(i)))
			}
			buf := bytes.Repeat([]byte{val}, n)
			var got int
			if write {
				got, err = m.WriteAt(buf, int64(addr))
			} else {
				got, err = m.ReadAt(buf, int64(addr))
			}
			if int64(addr) < 0 && n > 0 {
				ok = false
			}
			if !ok {
				require.Error(t, err, "addr %#x n %d", addr, n)
				require.Zero(t, got)
				require.NotErrorIs(t, err, arena.ErrFault, "an access outside RAM reached memory")
				continue
			}
			require.NoError(t, err, "addr %#x n %d", addr, n)
			require.Equal(t, n, got)
			for i := 0; i < n; i++ {
				a := guestmem.GuestAddress(addr + uint64(i))
				if write {
					shadow[a] = val
				} else {
					require.Equal(t, shadow[a], buf[i], "byte at %v", a)
				}
			}
		}
		// Whole-RAM check: exactly what the shadow says.
		for _, r := range l {
			b := make([]byte, r.Size)
			_, err := m.ReadAt(b, int64(r.GPA))
			require.NoError(t, err)
			for i := range b {
				require.Equal(t, shadow[r.GPA+guestmem.GuestAddress(i)], b[i])
			}
		}
	})
}

// The 8- and 16-bit accessors, like the wider ones, read back what they
// wrote, mark the page dirty, and may cross contiguous regions.
func TestNarrowTypedAccess(t *testing.T) {
	m := newMemory(t, twoRegions)
	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	require.NoError(t, m.WriteUint8(5, 0xab))
	v8, err := m.ReadUint8(5)
	require.NoError(t, err)
	require.Equal(t, uint8(0xab), v8)
	require.NoError(t, m.WriteUint16(4*mib-1, 0x1234)) // across the boundary at 4 MiB
	v16, err := m.ReadUint16(4*mib - 1)
	require.NoError(t, err)
	require.Equal(t, uint16(0x1234), v16)
	lo, err := m.ReadUint8(4*mib - 1)
	require.NoError(t, err)
	require.Equal(t, uint8(0x34), lo, "little-endian")
	d, err := m.CollectDirty()
	require.NoError(t, err)
	require.Equal(t, uint64(3), d.Pages(), "page 0, the last page of region 0, the first of region 1")
	_, err = m.ReadUint16(6*mib - 1)
	require.ErrorIs(t, err, guestmem.ErrHole)
}
