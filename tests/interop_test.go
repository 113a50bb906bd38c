//go:build amd64

package tests

import (
	"testing"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

// A VM made by gokvm's kvm package, adopted: guestmem registers its guest
// RAM, guest code runs on it, and dirty tracking is exact. Borrowed leaves
// the caller's descriptor open after the VM closes; Owned closes it.
func TestAdoptGokvmVM(t *testing.T) {
	for _, own := range []kvm.Ownership{kvm.Borrowed, kvm.Owned} {
		name := map[kvm.Ownership]string{kvm.Borrowed: "borrowed", kvm.Owned: "owned"}[own]
		t.Run(name, func(t *testing.T) {
			noLeaks(t)
			d := testenv.KVM(t)
			vmfd, err := gokvm.CreateVM(uintptr(d.FD()))
			require.NoError(t, err)
			if own == kvm.Borrowed {
				t.Cleanup(func() { unix.Close(int(vmfd)) })
			}
			vm, err := d.Adopt(int(vmfd), own)
			require.NoError(t, err)
			if own == kvm.Borrowed {
				require.NotEqual(t, int(vmfd), vm.FD(), "a borrowed descriptor is duplicated")
			} else {
				require.Equal(t, int(vmfd), vm.FD())
			}

			m := newMem(t, guestmem.Layout{{GPA: 0, Size: 16 * mib}}, guestmem.WithMemfd())
			mach, err := guest.New(vm, guest.Config{})
			require.NoError(t, err)
			require.NoError(t, m.StartDirtyTracking())
			require.NoError(t, m.Register(vm))
			_, err = m.CollectDirty()
			require.NoError(t, err)
			fill(t, mach, 5*page, 7*page, seed)
			require.Equal(t, hostSum(t, m, 5*page, 7*page), guestSum(t, mach, 5*page, 7*page))
			d1, err := m.CollectDirty()
			require.NoError(t, err)
			require.Equal(t, []guestmem.Span{{GPA: 5 * page, Size: 2 * page}}, collect(d1))

			require.NoError(t, mach.Close())
			require.NoError(t, vm.Close())
			_, err = unix.FcntlInt(vmfd, unix.F_GETFD, 0)
			if own == kvm.Borrowed {
				require.NoError(t, err, "a borrowed descriptor stays the caller's")
			} else {
				require.Error(t, err, "an owned descriptor is closed with the VM")
			}
		})
	}
}

// A slot made outside the package is declared, so the table refuses to
// overlap it and AddSlot skips its number; a non-VM descriptor is refused.
func TestDeclareSlotMadeElsewhere(t *testing.T) {
	noLeaks(t)
	d := testenv.KVM(t)
	vm := testenv.VM(t)
	mem, err := arena.NewAnon(4*mib, arena.NoReserve())
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	region := &gokvm.UserspaceMemoryRegion{Slot: 0, GuestPhysAddr: 0, MemorySize: 2 * mib,
		UserspaceAddr: uint64(mem.Addr())}
	require.NoError(t, gokvm.SetUserMemoryRegion(uintptr(vm.FD()), region))
	require.NoError(t, vm.DeclareSlot(kvm.Slot{ID: 0, GPA: 0, Size: 2 * mib, HostAddr: mem.Addr()}))
	_, err = vm.AddSlot(kvm.Slot{GPA: mib, Size: 2 * mib, HostAddr: mem.Addr() + 2*mib})
	require.ErrorIs(t, err, kvm.ErrSlotOverlap)
	s, err := vm.AddSlot(kvm.Slot{GPA: 2 * mib, Size: 2 * mib, HostAddr: mem.Addr() + 2*mib})
	require.NoError(t, err)
	require.Equal(t, uint32(1), s.ID, "the declared slot's number is taken")
	require.ErrorIs(t, vm.DeclareSlot(kvm.Slot{ID: 1, GPA: 8 * mib, Size: 2 * mib, HostAddr: mem.Addr()}),
		kvm.ErrSlotOverlap, "a number in the table already")
	require.NoError(t, vm.DeleteSlot(0), "a declared slot is deleted as any other")

	_, err = d.Adopt(d.FD(), kvm.Borrowed)
	require.ErrorIs(t, err, kvm.ErrNotKVMFD, "the device fd is not a VM")
	_, err = vm.AdoptVCPU(vm.FD(), 0, kvm.Borrowed)
	require.ErrorIs(t, err, kvm.ErrNotKVMFD, "the VM fd is not a vCPU")
}
