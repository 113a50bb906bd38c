//go:build amd64

package tests

import (
	"bytes"
	"context"
	"io"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

// gmemMachine creates a VM whose guest_memfd the host can map (skipping,
// or failing under GMEM_REQUIRE_KVM=1, where the kernel is older than
// 6.18), guest_memfd memory with layout l on it, and a long-mode machine
// on the VM with the memory registered.
func gmemMachine(t *testing.T, l guestmem.Layout, opts ...guestmem.Option) (*kvm.VM, *guestmem.Memory, *guest.Machine) {
	t.Helper()
	vm := testenv.VM(t)
	const want = kvm.GuestMemfdMmap | kvm.GuestMemfdInitShared
	if f, err := vm.GuestMemfdFlags(); err != nil || f&want != want {
		testenv.Skip(t, "guest_memfd cannot be mapped by the host here (flags %v, %v): Linux 6.18 needed", f, err)
	}
	m := newMem(t, l, append([]guestmem.Option{guestmem.WithGuestMemfd(vm)}, opts...)...)
	mach, err := guest.New(vm, guest.Config{})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, mach.Close()) })
	require.NoError(t, m.Register(vm))
	return vm, m, mach
}

// The guest and the host see the same guest_memfd memory: the guest fills
// every page of every region and the host reads each value back through
// its mapping (sums and single pages); the host writes a pattern into a
// region and the guest verifies it, and finds the one page the host then
// spoils. Every slot is a guest_memfd slot at its region's offset.
func TestGuestMemfdSharedWithGuest(t *testing.T) {
	noLeaks(t)
	vm, m, mach := gmemMachine(t, threeRegions)
	for _, s := range vm.Slots() {
		if s.ID == mach.Slot() {
			continue
		}
		require.Equal(t, kvm.GuestMemfdSlot, s.Flags)
		require.Same(t, m.GuestMemfd(), s.GuestMemfd)
		r, err := m.Region(guestmem.GuestAddress(s.GPA))
		require.NoError(t, err)
		require.Equal(t, uint64(r.FDOffset), s.GuestMemfdOffset)
		require.Equal(t, r.HostAddr, s.HostAddr)
	}
	for i, r := range m.Regions() {
		start, end := uint64(r.GPA), uint64(r.End())
		fill(t, mach, start, end, seed+uint64(i))
		require.Equal(t, int(r.Size/page), testenv.ResidentPages(t, r.HostAddr, r.Size),
			"the guest's writes are in the guest_memfd's pages")
		require.Equal(t, hostSum(t, m, start, end), guestSum(t, mach, start, end), "region %d", i)
		v, err := m.ReadUint64(r.GPA + guestmem.GuestAddress(r.Size) - page)
		require.NoError(t, err)
		require.Equal(t, guest.Pattern(end-page, seed+uint64(i)), v)
	}
	// Host writes, guest reads.
	const hseed = 0x4057_0000_0000
	r := m.Regions()[1]
	for a := uint64(r.GPA); a < uint64(r.End()); a += page {
		require.NoError(t, m.WriteUint64(guestmem.GuestAddress(a), guest.Pattern(a, hseed)))
	}
	guestVerify(t, mach, uint64(r.GPA), uint64(r.End()), hseed)
	bad := uint64(r.GPA) + 37*page
	require.NoError(t, m.WriteUint64(guestmem.GuestAddress(bad), 1))
	res := run(t, mach, guest.VerifyPages(), kvm.Regs{RSI: uint64(r.GPA), RDI: uint64(r.End()), RDX: hseed, RBX: page},
		guest.Handlers{})
	_, failed := res.Port(guest.PortFail)
	require.True(t, failed, "the guest sees the host's spoiled page")
	at, _ := res.Port64(guest.PortLo, guest.PortHi)
	require.Equal(t, bad, at)
}

// Discard punches a hole in the guest_memfd: its pages leave the page
// cache (mincore), the guest reads zeros there, and its data elsewhere.
func TestGuestMemfdDiscardSeenByGuest(t *testing.T) {
	noLeaks(t)
	const size = 32 * mib
	_, m, mach := gmemMachine(t, guestmem.Layout{{GPA: 0, Size: size}})
	fill(t, mach, 0, size, seed)
	r := m.Regions()[0]
	require.Equal(t, size/page, testenv.ResidentPages(t, r.HostAddr, size))
	const lo, hi = 8 * mib, 24 * mib
	require.NoError(t, m.Discard(lo, hi-lo))
	require.Equal(t, (size-(hi-lo))/page, testenv.ResidentPages(t, r.HostAddr, size), "the hole's pages are freed")
	require.Zero(t, guestSum(t, mach, lo, hi), "the guest reads zeros where memory was discarded")
	guestVerify(t, mach, 0, lo, seed)
	guestVerify(t, mach, hi, size, seed)
	// The guest writes into the hole again: new pages, seen by the host.
	fill(t, mach, lo, lo+mib, seed^1)
	v, err := m.ReadUint64(lo + page)
	require.NoError(t, err)
	require.Equal(t, guest.Pattern(lo+page, seed^1), v)
}

// A full Save of guest_memfd memory written by the guest restores (eagerly,
// into guest_memfd on a second VM) to what a guest there verifies; only
// the pages the guest wrote are saved (mincore finds them).
func TestGuestMemfdSaveRestoreIntoNewVM(t *testing.T) {
	noLeaks(t)
	layout := guestmem.Layout{{GPA: 0, Size: 32 * mib}, {GPA: 64 * mib, Size: 16 * mib}}
	_, m, mach := gmemMachine(t, layout)
	for a := uint64(0); a < 32*mib; a += 2 * mib {
		fill(t, mach, a, a+mib, seed)
	}
	fill(t, mach, 64*mib, 80*mib, seed)
	var buf bytes.Buffer
	st, err := m.Save(context.Background(), &buf, guestmem.SaveOptions{})
	require.NoError(t, err)
	require.Equal(t, uint64(16*mib+16*mib), st.DataBytes, "only what the guest wrote is saved")

	vm2 := testenv.VM(t)
	r, err := guestmem.Restore(context.Background(), []io.Reader{&buf}, guestmem.WithGuestMemfd(vm2))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, r.Close()) })
	require.Equal(t, guestmem.GuestMemfd, r.Backing())
	mach2, err := guest.New(vm2, guest.Config{})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, mach2.Close()) })
	require.NoError(t, r.Register(vm2))
	for a := uint64(0); a < 32*mib; a += 2 * mib {
		guestVerify(t, mach2, a, a+mib, seed)
		require.Zero(t, guestSum(t, mach2, a+mib, a+2*mib), "unwritten memory restores as zeros")
	}
	guestVerify(t, mach2, 64*mib, 80*mib, seed)
}

// Hotplug within the guest_memfd's reserved space: the guest reaches the
// new region at once and the host reads what it wrote; removing the region
// punches its pages out and sends the guest back to MMIO exits; a region
// larger than the space left is ErrHotplugSpace.
func TestGuestMemfdHotplugSeenByGuest(t *testing.T) {
	noLeaks(t)
	vm, m, mach := gmemMachine(t, guestmem.Layout{{GPA: 0, Size: 8 * mib}}, guestmem.WithHotplug(16*mib))
	const at = 1 << 30
	_, err := m.AddRegion(guestmem.RegionSpec{GPA: at, Size: 32 * mib})
	require.ErrorIs(t, err, guestmem.ErrHotplugSpace)
	r, err := m.AddRegion(guestmem.RegionSpec{GPA: at, Size: 16 * mib})
	require.NoError(t, err)
	require.Equal(t, int64(8*mib), r.FDOffset, "placed in the hotplug space after the region from New")
	s, ok := vm.SlotAt(at)
	require.True(t, ok)
	require.Equal(t, uint64(8*mib), s.GuestMemfdOffset)
	require.Equal(t, kvm.GuestMemfdSlot, s.Flags)
	fill(t, mach, at, at+16*mib, seed)
	require.Equal(t, hostSum(t, m, at, at+16*mib), guestSum(t, mach, at, at+16*mib))
	require.NoError(t, m.RemoveRegion(at))
	_, ok = vm.SlotAt(at)
	require.False(t, ok)
	res := run(t, mach, guest.Load(), kvm.Regs{RSI: at}, guest.Handlers{})
	require.Len(t, res.MMIO, 1, "the removed region is MMIO for the guest")
	// The space is free again.
	_, err = m.AddRegion(guestmem.RegionSpec{GPA: at, Size: 16 * mib})
	require.NoError(t, err)
	require.Zero(t, guestSum(t, mach, at, at+16*mib), "the punched space comes back zero")
}
