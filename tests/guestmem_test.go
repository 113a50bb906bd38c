//go:build amd64

package tests

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

// threeRegions has a hole between every region, and RAM above 4 GiB.
var threeRegions = guestmem.Layout{
	{GPA: 0, Size: 16 * mib},
	{GPA: 64 * mib, Size: 8 * mib},
	{GPA: 1 << 32, Size: 16 * mib},
}

// For each backing: the guest writes a distinct value into every page of
// every region and checksums what it wrote; the host's checksum through
// guestmem matches, region by region.
func TestGuestFillsEveryPageOfEveryBacking(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts func(t *testing.T) []guestmem.Option
	}{
		{"anonymous", func(*testing.T) []guestmem.Option { return nil }},
		{"memfd", func(*testing.T) []guestmem.Option {
			return []guestmem.Option{guestmem.WithMemfd()}
		}},
		{"hugetlb", func(t *testing.T) []guestmem.Option {
			testenv.NeedHugetlbPages(t, int(threeRegions.Size()/(2*mib)))
			return []guestmem.Option{guestmem.WithHugetlb(2 * mib)}
		}},
		{"file", func(t *testing.T) []guestmem.Option {
			p := filepath.Join(t.TempDir(), "ram")
			require.NoError(t, os.WriteFile(p, nil, 0o600))
			require.NoError(t, os.Truncate(p, guestmem.FileSize(threeRegions)))
			f, err := os.Open(p)
			require.NoError(t, err)
			t.Cleanup(func() { f.Close() })
			return []guestmem.Option{guestmem.WithFile(f)}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			noLeaks(t)
			m := newMem(t, threeRegions, tc.opts(t)...)
			mach := vmWith(t, m)
			for i, r := range m.Regions() {
				start, end := uint64(r.GPA), uint64(r.End())
				fill(t, mach, start, end, seed+uint64(i))
				require.Equal(t, hostSum(t, m, start, end), guestSum(t, mach, start, end), "region %d", i)
				// Every page holds its own value.
				v, err := m.ReadUint64(r.GPA + guestmem.GuestAddress(r.Size) - page)
				require.NoError(t, err)
				require.Equal(t, guest.Pattern(end-page, seed+uint64(i)), v)
			}
		})
	}
}

// Prefault populates all guest RAM before the guest runs; without it,
// resident memory grows only with what the guest touches.
func TestPrefaultAndGuestTouch(t *testing.T) {
	noLeaks(t)
	const size = 32 * mib
	resident := func(m *guestmem.Memory) uint64 {
		st, err := m.Stats()
		require.NoError(t, err)
		var n uint64
		for _, s := range st {
			n += s.Resident
		}
		return n
	}
	m := newMem(t, guestmem.Layout{{GPA: 0, Size: size}}, guestmem.WithMemfd())
	require.NoError(t, m.Prefault(context.Background(), guestmem.PrefaultOptions{}))
	require.Equal(t, uint64(size), resident(m), "prefaulted before any guest code ran")

	lazy := newMem(t, guestmem.Layout{{GPA: 0, Size: size}}, guestmem.WithoutHugepages())
	mach := vmWith(t, lazy)
	require.Zero(t, resident(lazy))
	const touched = 300
	fill(t, mach, 0, touched*page, seed)
	require.Equal(t, uint64(touched*page), resident(lazy), "Rss grows by exactly the pages the guest touched")
}

// LockOnFault: the guest touches N pages; Locked grows by N pages, not more.
func TestLockOnFaultCountsGuestTouches(t *testing.T) {
	noLeaks(t)
	m := newMem(t, guestmem.Layout{{GPA: 0, Size: 64 * mib}}, guestmem.WithMemfd())
	mach := vmWith(t, m)
	require.NoError(t, m.LockOnFault())
	locked := func() uint64 {
		st, err := m.Stats()
		require.NoError(t, err)
		return st[0].Locked
	}
	require.Zero(t, locked())
	const n = 200
	fill(t, mach, 8*mib, 8*mib+n*page, seed)
	require.Equal(t, uint64(n*page), locked())
	require.NoError(t, m.Unlock())
	require.Zero(t, locked())
}

// A device-style exchange: the guest writes a descriptor, the host reads it
// by guest address and writes a reply that the guest reads back.
func TestDeviceStyleDescriptor(t *testing.T) {
	noLeaks(t)
	m := newMem(t, threeRegions, guestmem.WithMemfd())
	mach := vmWith(t, m)
	type desc struct {
		Addr  uint64
		Len   uint32
		Flags uint16
		Next  uint16
	}
	const at = 1<<32 + 0x3000
	want := desc{Addr: 1<<32 + 0x8000, Len: 512, Flags: 1, Next: 3}
	var words [2]uint64
	words[0] = want.Addr
	words[1] = uint64(want.Len) | uint64(want.Flags)<<32 | uint64(want.Next)<<48
	for i, w := range words {
		run(t, mach, guest.Store(), kvm.Regs{RSI: at + uint64(i)*8, RDX: w}, guest.Handlers{})
	}
	var got desc
	require.NoError(t, m.ReadValue(at, &got))
	require.Equal(t, want, got)

	require.NoError(t, m.WriteUint64(guestmem.GuestAddress(got.Addr), 0xacce_97ed))
	res := run(t, mach, guest.Load(), kvm.Regs{RSI: got.Addr}, guest.Handlers{})
	v, ok := res.Port64(guest.PortLo, guest.PortHi)
	require.True(t, ok)
	require.Equal(t, uint64(0xacce_97ed), v)
}

// Register is all or nothing, and refuses twice.
func TestRegisterErrors(t *testing.T) {
	noLeaks(t)
	m := newMem(t, threeRegions)
	vm := testenv.VM(t)
	require.NoError(t, m.Register(vm))
	require.Len(t, vm.Slots(), 3)
	require.ErrorIs(t, m.Register(vm), guestmem.ErrRegistered)
	require.NoError(t, m.Unregister())
	require.Empty(t, vm.Slots())
	require.ErrorIs(t, m.Unregister(), guestmem.ErrNotRegistered)

	// A slot in the way: nothing is left half-registered.
	blocker := newMem(t, guestmem.Layout{{GPA: 1 << 32, Size: 2 * mib}})
	require.NoError(t, blocker.Register(vm))
	err := m.Register(vm)
	require.ErrorIs(t, err, kvm.ErrSlotOverlap)
	require.Len(t, vm.Slots(), 1, "the regions registered before the failure were removed")
	require.Nil(t, m.VM())

	closed := testenv.VM(t)
	require.NoError(t, closed.Close())
	require.ErrorIs(t, m.Register(closed), kvm.ErrClosed)
}
