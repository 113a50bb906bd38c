//go:build amd64

package tests

// The dirty ring (kvm.VM.EnableDirtyRing) with real guest writes: it reports
// exactly the pages the guest wrote, the same pages the bitmap reports for
// the same program, survives a full ring, and harvests while the guest runs.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

// ringEnv is a VM, logging dirty pages into rings or bitmaps, with a
// guest.Machine (its page tables in the system slot, never logged) and one
// dirty-logged RAM slot.
type ringEnv struct {
	t     testing.TB
	vm    *kvm.VM
	m     *guest.Machine
	slot  kvm.Slot
	touch uint64 // touchPages
	fill  uint64 // guest.FillPages
}

const ringBase = 8 * kGiB // the RAM slot's guest address

// newRingEnv makes the VM; ringBytes 0 means the bitmap, -1 the smallest
// ring the kernel accepts, and otherwise that ring size (at most the
// kernel's largest). A size of 0 makes the RAM slot four times as many
// pages as the ring has entries.
func newRingEnv(t testing.TB, ringBytes int, size uint64) *ringEnv {
	t.Helper()
	if tt, ok := t.(*testing.T); ok {
		kvmLeakCheck(tt)
	}
	e := &ringEnv{t: t, vm: testenv.VM(t)}
	switch {
	case ringBytes < 0:
		needRing(t, e.vm)
		e.enableSmallestRing()
	case ringBytes > 0:
		max := needRing(t, e.vm)
		require.NoError(t, e.vm.EnableDirtyRing(min(ringBytes, max)))
	}
	if size == 0 {
		size = uint64(e.vm.DirtyRingBytes()/16) * 4 * kPage
	}
	m, err := guest.New(e.vm, guest.Config{})
	require.NoError(t, err)
	e.m = m
	t.Cleanup(func() { require.NoError(t, m.Close()) })
	ram, err := arena.NewAnon(int64(size), arena.NoReserve())
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, ram.Close()) })
	e.slot, err = e.vm.AddSlot(kvm.Slot{GPA: ringBase, Size: size, HostAddr: ram.Addr(), Flags: kvm.LogDirtyPages})
	require.NoError(t, err)
	t.Cleanup(func() {
		if err := e.vm.DeleteSlot(e.slot.ID); err != nil && !errors.Is(err, kvm.ErrNoSlot) {
			t.Error(err)
		}
	})
	e.touch, err = m.LoadAsm(touchPages())
	require.NoError(t, err)
	e.fill, err = m.LoadAsm(guest.FillPages())
	require.NoError(t, err)
	return e
}

// needRing skips t unless the kernel has a dirty ring, and returns its
// largest size.
func needRing(t testing.TB, vm *kvm.VM) int {
	t.Helper()
	c := vm.Capabilities()
	if c.DirtyRingAcqRel <= 0 && c.DirtyRingBytes <= 0 {
		testenv.Skip(t, "no KVM_CAP_DIRTY_LOG_RING_ACQ_REL (nor KVM_CAP_DIRTY_LOG_RING) on this kernel")
	}
	return max(c.DirtyRingAcqRel, c.DirtyRingBytes)
}

// enableSmallestRing enables the smallest ring the kernel takes: a page,
// or more where it reserves more entries (PML on Intel hosts). A refused
// size changes nothing, so the sizes are tried in turn on the one VM.
func (e *ringEnv) enableSmallestRing() {
	max := needRing(e.t, e.vm)
	for size := os.Getpagesize(); size <= max; size *= 2 {
		err := e.vm.EnableDirtyRing(size)
		if err == nil {
			return
		}
		require.ErrorIs(e.t, err, kvm.ErrDirtyRingSize)
	}
	e.t.Fatalf("the kernel refused every dirty ring size up to %d bytes", max)
}

// touchPages writes, for each of the RCX quadwords of the table at RSI
// (guest-physical addresses), the address to itself, then reports on
// PortDone and halts. RCX must not be 0.
func touchPages() *guest.Asm {
	a := &guest.Asm{}
	a.Label("loop")
	a.Load(guest.RAX, guest.RSI)
	a.Store(guest.RAX, guest.RAX)
	a.AddImm(guest.RSI, 8)
	a.Dec(guest.RCX)
	a.Jnz("loop")
	a.Out(guest.PortDone)
	a.Hlt()
	return a
}

// write has the guest write one quadword on each of pages of the RAM slot.
func (e *ringEnv) write(pages []uint64) {
	e.t.Helper()
	table := make([]byte, 8*len(pages))
	for i, p := range pages {
		binary.LittleEndian.PutUint64(table[8*i:], ringBase+p*kPage+8)
	}
	at, err := e.m.Load(table)
	require.NoError(e.t, err)
	res, err := e.m.Call(e.touch, kvm.Regs{RSI: at, RCX: uint64(len(pages))}, guest.Handlers{})
	require.NoError(e.t, err)
	_, done := res.Port(guest.PortDone)
	require.True(e.t, done, "the guest did not finish: %+v", res)
}

// fillAll has the guest write the first quadword of every stride bytes of
// the RAM slot.
func (e *ringEnv) fillAll(stride uint64) {
	e.t.Helper()
	res, err := e.m.Call(e.fill, kvm.Regs{RSI: ringBase, RDI: ringBase + e.slot.Size, RBX: stride, RDX: 0x5a},
		guest.Handlers{})
	require.NoError(e.t, err)
	_, done := res.Port(guest.PortDone)
	require.True(e.t, done, "the guest did not finish: %+v", res)
}

// log returns the slot's dirty pages as GetDirtyLog reports them.
func (e *ringEnv) log() []uint64 {
	e.t.Helper()
	bm := make([]uint64, kvm.DirtyBitmapWords(e.slot.Pages()))
	require.NoError(e.t, e.vm.GetDirtyLog(e.slot.ID, bm))
	return dirtyPagesOf(bm)
}

// chosenPages returns n distinct pages of a slot of total pages, sorted,
// spread by a fixed pseudo-random walk, with the first and last page.
func chosenPages(n int, total uint64) []uint64 {
	set := map[uint64]bool{0: true, total - 1: true}
	x := uint64(0x9e3779b97f4a7c15)
	for len(set) < n {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		set[x%total] = true
	}
	out := make([]uint64, 0, n)
	for p := range set {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// TestDirtyRingMatchesBitmap runs the same guest writes on a VM with dirty
// rings and on one with the bitmap: both report exactly the pages written,
// and the same; then, after more writes, both report only those.
func TestDirtyRingMatchesBitmap(t *testing.T) {
	const size = 64 * kMiB
	pages := chosenPages(300, size/kPage)
	again := slices.Clone(pages[100:150])
	got := map[string][2][]uint64{}
	for _, mode := range []string{"ring", "bitmap"} {
		t.Run(mode, func(t *testing.T) {
			e := newRingEnv(t, map[string]int{"ring": 64 << 10, "bitmap": 0}[mode], size)
			if mode == "ring" {
				require.NotZero(t, e.vm.DirtyRingBytes())
				require.Empty(t, e.log(), "dirty before the guest ran")
			}
			e.write(pages)
			if mode == "ring" {
				// Every write is an entry: a page written once is at least
				// one (KVM's emulator logs each write, hardware the first).
				n, err := e.vm.HarvestDirtyRings()
				require.NoError(t, err)
				require.GreaterOrEqual(t, n, len(pages))
				require.Zero(t, e.m.CPU.DirtyRingFullExits(), "a 64 KiB ring filled with %d pages", len(pages))
			}
			first := e.log()
			require.Equal(t, pages, first)
			require.Empty(t, e.log(), "the log was not reset")
			e.write(again)
			second := e.log()
			require.Equal(t, again, second)
			got[mode] = [2][]uint64{first, second}
		})
	}
	if len(got) == 2 {
		require.Equal(t, got["bitmap"], got["ring"], "ring and bitmap disagree")
	}
}

// TestDirtyRingFull: with the smallest ring the kernel accepts, a guest
// writing four times as many pages as the ring holds makes the vCPU exit
// with a full ring; Run harvests and goes on unseen, and every page is
// reported.
func TestDirtyRingFull(t *testing.T) {
	e := newRingEnv(t, -1, 0)
	entries := e.vm.DirtyRingBytes() / 16
	t.Logf("smallest ring: %d bytes, %d entries; the guest writes %d pages", e.vm.DirtyRingBytes(), entries,
		e.slot.Pages())
	e.fillAll(kPage)
	require.NotZero(t, e.m.CPU.DirtyRingFullExits(), "no ring-full exit for %d pages in a %d-entry ring",
		e.slot.Pages(), entries)
	all := make([]uint64, e.slot.Pages())
	for i := range all {
		all[i] = uint64(i)
	}
	require.Equal(t, all, e.log())
	n, err := e.vm.HarvestDirtyRings()
	require.NoError(t, err, "entries dropped")
	require.Zero(t, n)
}

// TestDirtyRingHarvestWhileGuestRuns harvests in a loop on another
// goroutine while the guest writes 16384 pages into a ring of 4096
// entries: no entry is dropped or lost, and the log holds every page.
func TestDirtyRingHarvestWhileGuestRuns(t *testing.T) {
	e := newRingEnv(t, 64<<10, 64*kMiB)
	done := make(chan struct{})
	var wg sync.WaitGroup
	harvests, entries := 0, 0
	wg.Go(func() {
		for {
			select {
			case <-done:
				return
			default:
			}
			n, err := e.vm.HarvestDirtyRings()
			if err != nil {
				t.Error(err)
				return
			}
			harvests++
			entries += n
		}
	})
	e.fillAll(kPage)
	close(done)
	wg.Wait()
	t.Logf("%d harvests took %d entries while the guest ran; %d ring-full exits", harvests, entries,
		e.m.CPU.DirtyRingFullExits())
	all := make([]uint64, e.slot.Pages())
	for i := range all {
		all[i] = uint64(i)
	}
	require.Equal(t, all, e.log())
}

// TestEnableDirtyRingAfterVCPU: KVM takes a ring only before the first
// vCPU; the package says so (ErrVCPUExists), also once that vCPU is closed,
// before asking the kernel.
func TestEnableDirtyRingAfterVCPU(t *testing.T) {
	kvmLeakCheck(t)
	vm := testenv.VM(t)
	max := needRing(t, vm)
	c, err := vm.CreateVCPU(0)
	require.NoError(t, err)
	err = vm.EnableDirtyRing(max)
	require.ErrorIs(t, err, kvm.ErrVCPUExists)
	require.Contains(t, err.Error(), "before the first")
	require.NoError(t, c.Close())
	require.ErrorIs(t, vm.EnableDirtyRing(max), kvm.ErrVCPUExists)
	require.Zero(t, vm.DirtyRingBytes())
}

// TestDirtyRingModes: on a ring VM, a second EnableDirtyRing, manual
// protect and ClearDirtyLog are refused; a second vCPU gets a ring of its
// own (mapped, and unmapped by Close, which the leak check sees); pages a
// vCPU logged and nobody harvested are still reported after it is closed.
func TestDirtyRingModes(t *testing.T) {
	e := newRingEnv(t, -1, 4*kMiB)
	require.ErrorIs(t, e.vm.EnableDirtyRing(e.vm.DirtyRingBytes()), kvm.ErrDirtyLogMode)
	require.ErrorIs(t, e.vm.EnableManualDirtyLog(), kvm.ErrDirtyLogMode)
	require.ErrorIs(t, e.vm.ClearDirtyLog(e.slot.ID, 0, 64, make([]uint64, 1)), kvm.ErrDirtyLogMode)
	other, err := e.vm.CreateVCPU(1)
	require.NoError(t, err)
	e.write([]uint64{3, 7})
	require.NoError(t, e.m.CPU.Close()) // the Machine's Close closes it again: nil
	require.Equal(t, []uint64{3, 7}, e.log())
	require.NoError(t, other.Close())
}

// BenchmarkDirtyCollect collects the dirty pages of a 4 GiB slot with few
// and with many pages dirty, from the bitmap (KVM_GET_DIRTY_LOG) and from
// the ring (harvest, KVM_RESET_DIRTY_RINGS, then the same bitmap out of
// GetDirtyLog). The guest's writes are not timed.
func BenchmarkDirtyCollect(b *testing.B) {
	const size = 4 * kGiB
	for _, dirty := range []uint64{64, 16384} {
		for _, mode := range []string{"bitmap", "ring"} {
			b.Run(fmt.Sprintf("%d-dirty/%s", dirty, mode), func(b *testing.B) {
				e := newRingEnv(b, map[string]int{"ring": 1 << 20, "bitmap": 0}[mode], size)
				bm := make([]uint64, kvm.DirtyBitmapWords(e.slot.Pages()))
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					e.fillAll(size / dirty)
					b.StartTimer()
					if err := e.vm.GetDirtyLog(e.slot.ID, bm); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				if got := uint64(len(dirtyPagesOf(bm))); got != dirty {
					b.Fatalf("%d pages dirty, want %d", got, dirty)
				}
			})
		}
	}
}
