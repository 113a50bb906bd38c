//go:build amd64

package vhostuser_test

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
	"github.com/gmem-vmm/gmem/vhostuser"
)

// Guest code and a back-end process talk through guest RAM: the guest
// writes a pattern into 64 pages, the other process reads it through its
// own mapping and writes a reply into 64 other pages, and the guest
// verifies the reply. CollectDirty reports exactly the guest's pages (KVM's
// log) and the back end's (the shared log). Skips without /dev/kvm (fails
// under GMEM_REQUIRE_KVM=1).
func TestGuestAndBackendProcessExchange(t *testing.T) {
	vm := testenv.VM(t)
	m := newMemory(t, twoRegions, guestmem.WithMemfd())
	mach, err := guest.New(vm, guest.Config{})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, mach.Close()) })
	require.NoError(t, m.Register(vm))
	require.NoError(t, m.StartDirtyTracking())

	f, c := startChild(t, 0)
	e, err := vhostuser.Export(m, f)
	require.NoError(t, err)
	require.NoError(t, e.EnableDirtyLog())

	const (
		pages             = 64
		fillAt, replyAt   = gib, gib + mib
		fillSeed, ansSeed = 0x5eed_0000_0000, 0xa115_0000_0000
		fillEnd, replyEnd = fillAt + pages*page, replyAt + pages*page
	)
	call := func(prog *guest.Asm, regs kvm.Regs) guest.Result {
		at, err := mach.LoadAsm(prog)
		require.NoError(t, err)
		res, err := mach.Call(at, regs, guest.Handlers{})
		require.NoError(t, err)
		return res
	}
	res := call(guest.FillPages(), kvm.Regs{RSI: fillAt, RDI: fillEnd, RDX: fillSeed, RBX: page})
	_, done := res.Port(guest.PortDone)
	require.True(t, done, "the guest filled its pages")

	c.do(fmt.Sprintf("verify %#x %d %#x", uint64(fillAt), pages, uint64(fillSeed)))
	c.do(fmt.Sprintf("answer %#x %d %#x", uint64(replyAt), pages, uint64(ansSeed)))

	res = call(guest.VerifyPages(), kvm.Regs{RSI: replyAt, RDI: replyEnd, RDX: ansSeed, RBX: page})
	if _, failed := res.Port(guest.PortFail); failed {
		at, _ := res.Port64(guest.PortLo, guest.PortHi)
		t.Fatalf("the guest found a wrong reply at %#x", at)
	}
	_, done = res.Port(guest.PortDone)
	require.True(t, done, "the guest verified the back end's reply")

	d, err := m.CollectDirty()
	require.NoError(t, err)
	require.Equal(t, []guestmem.Span{
		{GPA: fillAt, Size: pages * page},
		{GPA: replyAt, Size: pages * page},
	}, spans(d), "the guest's pages from KVM, the back end's from the shared log")

	require.NoError(t, e.Close())
	require.NoError(t, f.Close())
	c.wait()
}

// guest_memfd memory exported to a back-end process: the child maps the
// guest_memfd it is sent (MAP_SHARED at each region's offset), reads what
// guest code wrote and writes a reply the guest verifies.
func TestGuestMemfdGuestAndBackendProcessExchange(t *testing.T) {
	vm := testenv.VM(t)
	const shared = kvm.GuestMemfdMmap | kvm.GuestMemfdInitShared
	if fl, err := vm.GuestMemfdFlags(); err != nil || fl&shared != shared {
		testenv.Skip(t, "guest_memfd cannot be mapped by the host here (flags %v, %v): Linux 6.18 needed", fl, err)
	}
	m := newMemory(t, twoRegions, guestmem.WithGuestMemfd(vm))
	mach, err := guest.New(vm, guest.Config{})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, mach.Close()) })
	require.NoError(t, m.Register(vm))

	f, c := startChild(t, 0)
	e, err := vhostuser.Export(m, f)
	require.NoError(t, err)
	const (
		pages             = 64
		fillAt, replyAt   = gib, gib + mib
		fillSeed, ansSeed = 0x5eed_0000_0000, 0xa115_0000_0000
	)
	call := func(prog *guest.Asm, regs kvm.Regs) guest.Result {
		at, err := mach.LoadAsm(prog)
		require.NoError(t, err)
		res, err := mach.Call(at, regs, guest.Handlers{})
		require.NoError(t, err)
		return res
	}
	res := call(guest.FillPages(), kvm.Regs{RSI: fillAt, RDI: fillAt + pages*page, RDX: fillSeed, RBX: page})
	_, done := res.Port(guest.PortDone)
	require.True(t, done)
	c.do(fmt.Sprintf("verify %#x %d %#x", uint64(fillAt), pages, uint64(fillSeed)))
	c.do(fmt.Sprintf("answer %#x %d %#x", uint64(replyAt), pages, uint64(ansSeed)))
	res = call(guest.VerifyPages(), kvm.Regs{RSI: replyAt, RDI: replyAt + pages*page, RDX: ansSeed, RBX: page})
	if _, failed := res.Port(guest.PortFail); failed {
		at, _ := res.Port64(guest.PortLo, guest.PortHi)
		t.Fatalf("the guest found a wrong reply at %#x", at)
	}
	_, done = res.Port(guest.PortDone)
	require.True(t, done, "the guest verified the back end's reply")
	require.NoError(t, e.Close())
	require.NoError(t, f.Close())
	c.wait()
}
