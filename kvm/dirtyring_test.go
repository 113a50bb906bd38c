package kvm

// The dirty ring's harvesting, over fake rings in anonymous memory that a
// fake kernel fills and resets as KVM does: entries written field by field,
// then published by an atomic store of DIRTY; reset only of entries the
// harvester marked RESET, in order. No /dev/kvm is needed.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// fakeRing is a dirty ring with the kernel's side of the protocol.
type fakeRing struct {
	r     *dirtyRing
	dirty uint32        // the kernel's next entry (the producer's own)
	reset atomic.Uint32 // the kernel's reset index
}

// newFakeRing maps a ring of n entries (a power of two) for vCPU vcpu.
func newFakeRing(t testing.TB, n, vcpu int) *fakeRing {
	t.Helper()
	size := max(n*gfnSize, os.Getpagesize())
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, unix.Munmap(mem)) })
	return &fakeRing{r: newDirtyRing(mem[:n*gfnSize], vcpu)}
}

// push appends an entry as KVM does: the fields, then flags = DIRTY with a
// release store. It reports false when the ring is full.
func (f *fakeRing) push(slot uint32, off uint64) bool {
	if f.dirty-f.reset.Load() >= f.r.n {
		return false
	}
	i := f.dirty & (f.r.n - 1)
	e := f.r.mem[int(i)*gfnSize:][:gfnSize]
	binary.NativeEndian.PutUint32(e[4:], slot)
	binary.NativeEndian.PutUint64(e[8:], off)
	f.r.storeFlags(i, gfnDirty)
	f.dirty++
	return true
}

// mustPush pushes entries that must fit.
func (f *fakeRing) mustPush(t testing.TB, entries ...[2]uint64) {
	t.Helper()
	for _, e := range entries {
		require.True(t, f.push(uint32(e[0]), e[1]), "ring full at entry %v", e)
	}
}

// kernelReset is KVM_RESET_DIRTY_RINGS for one ring: it frees the entries
// marked RESET, in order from the reset index, and stops at the first that
// is not.
func (f *fakeRing) kernelReset() int {
	n := 0
	for ; n < int(f.r.n); n++ {
		i := f.reset.Load() & (f.r.n - 1)
		if f.r.loadFlags(i)&gfnReset == 0 {
			break
		}
		f.r.storeFlags(i, 0)
		f.reset.Add(1)
	}
	return n
}

// fakeRingVM is a VM in ring mode over rings, with no kernel: its fd is
// /dev/null, and KVM_RESET_DIRTY_RINGS is the rings' kernelReset, counted
// in *resets. Slots are put in the table directly.
func fakeRingVM(t testing.TB, slots []Slot, rings ...*fakeRing) (*VM, *atomic.Int64) {
	t.Helper()
	vm := fakeVM(t, Capabilities{Memslots: 32, DirtyRingAcqRel: 1 << 20})
	resets := new(atomic.Int64)
	vm.ring.bytes = 4096
	vm.ring.reset = func() error {
		resets.Add(1)
		for _, f := range rings {
			f.kernelReset()
		}
		return nil
	}
	for i, f := range rings {
		f.r.vcpu = i
		vm.ring.rings = append(vm.ring.rings, f.r)
	}
	for _, s := range slots {
		vm.insertLocked(s)
	}
	return vm, resets
}

// fakeVM is a VM whose fds are /dev/null: every ioctl fails with ENOTTY.
func fakeVM(t testing.TB, caps Capabilities) *VM {
	t.Helper()
	f, err := os.Open(os.DevNull)
	require.NoError(t, err)
	g, err := os.Open(os.DevNull)
	require.NoError(t, err)
	vm := newVM(f, g, caps)
	t.Cleanup(func() { vm.Close() })
	return vm
}

func slot(id uint32, pages uint64, flags SlotFlags) Slot {
	return Slot{ID: id, GPA: uint64(id) << 32, Size: pages * pageSize, HostAddr: 1 << 40, Flags: flags}
}

// pagesOf lists the pages set in bitmap.
func pagesOf(bitmap []uint64) []uint64 {
	var out []uint64
	for w, bits := range bitmap {
		for b := uint64(0); b < 64; b++ {
			if bits&(1<<b) != 0 {
				out = append(out, uint64(w)*64+b)
			}
		}
	}
	return out
}

func TestDirtyRingHarvestInOrder(t *testing.T) {
	f := newFakeRing(t, 8, 0)
	var got [][2]uint64
	visit := func(slot uint32, off uint64) { got = append(got, [2]uint64{uint64(slot), off}) }

	// A partly filled ring: harvest stops at the first entry KVM has not
	// published, and marks each one it read RESET (and no longer DIRTY).
	first := [][2]uint64{{0, 10}, {1, 11}, {0, 12}, {2, 13}, {0, 14}}
	f.mustPush(t, first...)
	require.Equal(t, 5, f.r.harvest(visit))
	require.Equal(t, first, got)
	for i := uint32(0); i < 5; i++ {
		require.Equal(t, uint32(gfnReset), f.r.loadFlags(i), "entry %d", i)
	}
	require.Zero(t, f.r.loadFlags(5))
	require.Equal(t, 0, f.r.harvest(visit), "marked entries are not harvested twice")
	require.Equal(t, 5, f.kernelReset())

	// Around the end of the ring: entries 5, 6, 7, 0, 1, 2.
	got = nil
	wrap := [][2]uint64{{3, 20}, {3, 21}, {3, 22}, {4, 23}, {4, 24}, {4, 25}}
	f.mustPush(t, wrap...)
	require.Equal(t, 6, f.r.harvest(visit))
	require.Equal(t, wrap, got)
	require.Equal(t, uint32(11), f.r.fetch)

	// Until the kernel resets, the ring has room for 2 entries only; a
	// full ring is harvested whole and no further.
	require.Equal(t, 6, f.kernelReset())
	got = nil
	var full [][2]uint64
	for i := range 8 {
		full = append(full, [2]uint64{5, uint64(100 + i)})
	}
	f.mustPush(t, full...)
	require.False(t, f.push(5, 200), "a ninth entry fits in an 8-entry ring")
	require.Equal(t, 8, f.r.harvest(visit))
	require.Equal(t, full, got)
	require.Equal(t, uint64(19), f.r.total)
}

func TestHarvestDirtyRingsIntoSlotBitmaps(t *testing.T) {
	a, b := newFakeRing(t, 64, 0), newFakeRing(t, 64, 1)
	vm, resets := fakeRingVM(t, []Slot{slot(0, 100, LogDirtyPages), slot(3, 64*3+5, LogDirtyPages), slot(5, 8, 0)},
		a, b)

	a.mustPush(t, [2]uint64{0, 0}, [2]uint64{0, 99}, [2]uint64{3, 64}, [2]uint64{0, 5})
	b.mustPush(t, [2]uint64{0, 5}, [2]uint64{3, 196},
		[2]uint64{3, 197},       // beyond slot 3's 197 pages
		[2]uint64{5, 1},         // slot 5 does not log
		[2]uint64{9, 0},         // no slot 9
		[2]uint64{1<<16 | 0, 2}) // address space 1
	n, err := vm.HarvestDirtyRings()
	require.Equal(t, 10, n)
	var bad *DirtyRingEntryError
	require.ErrorAs(t, err, &bad)
	require.ErrorIs(t, err, ErrDirtyRingEntry)
	require.Equal(t, DirtyRingEntryError{VCPU: 1, Slot: 3, Offset: 197, Reason: "beyond the slot's 197 pages",
		Count: 4}, *bad)
	require.Contains(t, err.Error(), "slot 3 (address space 0) page 197")
	require.Equal(t, int64(1), resets.Load(), "one KVM_RESET_DIRTY_RINGS for all rings")
	require.Equal(t, uint32(0), a.dirty-a.reset.Load(), "the kernel freed every entry")
	require.Equal(t, uint32(0), b.dirty-b.reset.Load(), "dropped entries are freed too")

	// GetDirtyLog hands out each slot's pages as KVM_GET_DIRTY_LOG's bitmap,
	// writing exactly DirtyBitmapWords words.
	bm := []uint64{^uint64(0), ^uint64(0), 0xdead}
	require.NoError(t, vm.GetDirtyLog(0, bm))
	require.Equal(t, []uint64{0, 5, 99}, pagesOf(bm[:2]))
	require.Equal(t, uint64(0xdead), bm[2], "a word beyond the slot's bitmap was written")
	bm3 := make([]uint64, DirtyBitmapWords(64*3+5))
	require.NoError(t, vm.GetDirtyLog(3, bm3))
	require.Equal(t, []uint64{64, 196}, pagesOf(bm3))

	// Handed out once: the next call reports only newer writes. A harvest
	// with nothing new issues no reset and reports no error.
	require.NoError(t, vm.GetDirtyLog(3, bm3))
	require.Empty(t, pagesOf(bm3))
	n, err = vm.HarvestDirtyRings()
	require.NoError(t, err)
	require.Zero(t, n)
	require.Equal(t, int64(1), resets.Load())

	// GetDirtyLog harvests by itself.
	b.mustPush(t, [2]uint64{3, 7})
	require.NoError(t, vm.GetDirtyLog(3, bm3))
	require.Equal(t, []uint64{7}, pagesOf(bm3))
	require.Equal(t, int64(2), resets.Load())

	// The slot table's own checks still come first.
	require.ErrorIs(t, vm.GetDirtyLog(5, bm), ErrNotLogging)
	require.ErrorIs(t, vm.GetDirtyLog(7, bm), ErrNoSlot)
	require.ErrorIs(t, vm.GetDirtyLog(3, bm3[:3]), ErrBitmapTooSmall)
}

func TestDirtyRingResetFailureLosesNothing(t *testing.T) {
	f := newFakeRing(t, 16, 0)
	vm, _ := fakeRingVM(t, []Slot{slot(1, 64, LogDirtyPages)}, f)
	kernel := vm.ring.reset
	vm.ring.reset = func() error { return syscall.EIO }
	f.mustPush(t, [2]uint64{1, 3}, [2]uint64{1, 4})
	bm := make([]uint64, 1)
	err := vm.GetDirtyLog(1, bm)
	require.ErrorIs(t, err, syscall.EIO)
	require.Contains(t, err.Error(), "KVM_RESET_DIRTY_RINGS")

	// The entries were harvested and stay marked; the next harvest resets
	// them, and GetDirtyLog reports the pages then.
	vm.ring.reset = kernel
	require.NoError(t, vm.GetDirtyLog(1, bm))
	require.Equal(t, []uint64{3, 4}, pagesOf(bm))
	require.Equal(t, uint32(0), f.dirty-f.reset.Load())
}

func TestDirtyRingSlotChanges(t *testing.T) {
	f := newFakeRing(t, 16, 0)
	s := slot(2, 64, LogDirtyPages)
	vm, _ := fakeRingVM(t, []Slot{s}, f)
	moved := s
	moved.GPA += 1 << 30
	for _, tc := range []struct {
		name string
		new  Slot
		drop bool
	}{
		{"move", moved, false},
		{"read-only", Slot{ID: 2, GPA: s.GPA, Size: s.Size, HostAddr: s.HostAddr, Flags: LogDirtyPages | ReadOnly}, false},
		{"logging off", Slot{ID: 2, GPA: s.GPA, Size: s.Size, HostAddr: s.HostAddr}, true},
		{"resize", Slot{ID: 2, GPA: s.GPA, Size: 2 * s.Size, HostAddr: s.HostAddr, Flags: LogDirtyPages}, true},
		{"delete", Slot{ID: 2}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f.mustPush(t, [2]uint64{2, 9})
			drop := vm.slotChanging(s, tc.new)
			require.Equal(t, tc.drop, drop)
			if drop {
				// Harvested while the table still describes the slot.
				require.Equal(t, []uint64{9}, pagesOf(vm.ring.pending[2].bits))
				vm.dropPending(2)
			}
			bm := make([]uint64, 1)
			require.NoError(t, vm.GetDirtyLog(2, bm))
			if drop {
				require.Empty(t, pagesOf(bm))
			} else {
				require.Equal(t, []uint64{9}, pagesOf(bm))
			}
		})
	}
}

func TestDirtyRingModeConflicts(t *testing.T) {
	vm, _ := fakeRingVM(t, []Slot{slot(0, 64, LogDirtyPages)}, newFakeRing(t, 16, 0))
	require.ErrorIs(t, vm.ClearDirtyLog(0, 0, 64, make([]uint64, 1)), ErrDirtyLogMode)
	vm.caps.ManualDirtyLog = true
	require.ErrorIs(t, vm.EnableManualDirtyLog(), ErrDirtyLogMode)
	require.ErrorIs(t, vm.EnableDirtyRing(4096), ErrDirtyLogMode)
	require.Equal(t, 4096, vm.DirtyRingBytes())

	bitmapVM := fakeVM(t, Capabilities{Memslots: 32})
	require.Zero(t, bitmapVM.DirtyRingBytes())
	_, err := bitmapVM.HarvestDirtyRings()
	require.ErrorIs(t, err, ErrDirtyLogMode)

	require.NoError(t, vm.Close())
	_, err = vm.HarvestDirtyRings()
	require.ErrorIs(t, err, fs.ErrClosed)
	require.ErrorIs(t, vm.EnableDirtyRing(4096), fs.ErrClosed)
}

func TestEnableDirtyRingChecks(t *testing.T) {
	ps := os.Getpagesize()
	caps := Capabilities{Memslots: 32, DirtyRingAcqRel: 1 << 20}
	for _, tc := range []struct {
		name  string
		caps  Capabilities
		setup func(*VM)
		bytes int
		want  error
	}{
		{"no ring", Capabilities{Memslots: 32}, nil, 4096, ErrUnsupported},
		{"zero", caps, nil, 0, ErrDirtyRingSize},
		{"negative", caps, nil, -4096, ErrDirtyRingSize},
		{"not a power of two", caps, nil, 3 * ps, ErrDirtyRingSize},
		{"below a page", caps, nil, ps / 2, ErrDirtyRingSize},
		{"above the maximum", caps, nil, 2 << 20, ErrDirtyRingSize},
		{"after a vCPU", caps, func(vm *VM) { vm.vcpusMade = 1 }, 4096, ErrVCPUExists},
		{"with manual protect", caps, func(vm *VM) { vm.manual = true }, 4096, ErrDirtyLogMode},
		// A good size reaches the kernel, here /dev/null.
		{"valid", caps, nil, 1 << 20, syscall.ENOTTY},
		{"the older ring on x86", Capabilities{Memslots: 32, DirtyRingBytes: 1 << 16}, nil, 1 << 16,
			map[bool]error{true: syscall.ENOTTY, false: ErrUnsupported}[runtime.GOARCH == "amd64"]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vm := fakeVM(t, tc.caps)
			if tc.setup != nil {
				tc.setup(vm)
			}
			err := vm.EnableDirtyRing(tc.bytes)
			require.ErrorIs(t, err, tc.want)
			require.Zero(t, vm.DirtyRingBytes())
			if tc.want == ErrUnsupported {
				require.ErrorIs(t, err, errors.ErrUnsupported)
			}
		})
	}
}

// TestHarvestDirtyRingsWhileProducing has two fake vCPUs push thousands of
// entries into 64-entry rings, waiting for room as KVM's vCPUs wait on a
// full ring, while harvesters collect: every page pushed is reported, and
// -race sees the atomic flags order the entries' fields.
func TestHarvestDirtyRingsWhileProducing(t *testing.T) {
	const perRing, pages = 5000, 1 << 12
	rings := []*fakeRing{newFakeRing(t, 64, 0), newFakeRing(t, 64, 1)}
	slots := []Slot{slot(0, pages, LogDirtyPages), slot(1, pages, LogDirtyPages), slot(2, pages, LogDirtyPages)}
	vm, _ := fakeRingVM(t, slots, rings...)
	want := map[[2]uint64]bool{}
	for v := range rings {
		for k := range perRing {
			want[[2]uint64{uint64(k % 3), uint64((k*7 + v*131) % pages)}] = true
		}
	}

	var producers sync.WaitGroup
	for v, f := range rings {
		producers.Go(func() {
			for k := range perRing {
				for !f.push(uint32(k%3), uint64((k*7+v*131)%pages)) {
					runtime.Gosched() // full: wait for a harvest and reset
				}
			}
		})
	}
	done := make(chan struct{})
	go func() { producers.Wait(); close(done) }()

	var mu sync.Mutex
	got := map[[2]uint64]bool{}
	collect := func() {
		for id := range uint32(3) {
			bm := make([]uint64, DirtyBitmapWords(pages))
			require.NoError(t, vm.GetDirtyLog(id, bm))
			mu.Lock()
			for _, p := range pagesOf(bm) {
				got[[2]uint64{uint64(id), p}] = true
			}
			mu.Unlock()
		}
	}
	var harvesters sync.WaitGroup
	harvesters.Go(func() {
		for {
			select {
			case <-done:
				return
			default:
			}
			_, err := vm.HarvestDirtyRings()
			require.NoError(t, err)
		}
	})
	harvesters.Go(func() {
		for {
			select {
			case <-done:
				return
			default:
				collect()
			}
		}
	})
	harvesters.Wait()
	collect() // what the last pushes left
	require.Equal(t, len(want), len(got))
	require.Equal(t, want, got)
}

// The ring's ABI numbers, from include/uapi/linux/kvm.h.
func TestDirtyRingABI(t *testing.T) {
	require.Equal(t, uintptr(0xAEC7), gokvm.IIO(nrResetDirtyRings), "KVM_RESET_DIRTY_RINGS")
	require.Equal(t, Cap(192), CapDirtyLogRing)
	require.Equal(t, Cap(223), CapDirtyLogRingAcqRel)
	require.Equal(t, Cap(225), CapDirtyLogRingBitmap)
	require.Equal(t, ExitReason(31), ExitDirtyRingFull)
	require.Equal(t, 16, gfnSize)
	require.Equal(t, 64, dirtyRingPageOffset)
}

func TestDirtyRingStrings(t *testing.T) {
	require.Equal(t, "dirty-ring-full", ExitDirtyRingFull.String())
	require.Equal(t, "dirty-ring-full", Exit{Reason: ExitDirtyRingFull}.String())
	require.Equal(t, "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP", CapDirtyLogRingBitmap.String())
	e := &DirtyRingEntryError{VCPU: 2, Slot: 1<<16 | 4, Offset: 8, Reason: "r", Count: 3}
	require.Equal(t, "kvm: dirty ring of vCPU 2: entry for slot 4 (address space 1) page 8: r; 3 entries dropped",
		e.Error())
}

// BenchmarkHarvestDirtyRing harvests a 4096-entry fake ring holding few or
// many entries into a 4 GiB slot's bitmap and hands it out (GetDirtyLog):
// the user-space cost of one collection round on the ring, without the
// kernel's reset.
func BenchmarkHarvestDirtyRing(b *testing.B) {
	const pages = 1 << 20
	for _, entries := range []int{16, 4000} {
		b.Run(fmt.Sprintf("%d-entries", entries), func(b *testing.B) {
			f := newFakeRing(b, 4096, 0)
			vm, _ := fakeRingVM(b, []Slot{slot(0, pages, LogDirtyPages)}, f)
			bm := make([]uint64, DirtyBitmapWords(pages))
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				for k := range entries {
					if !f.push(0, uint64(k*257%pages)) {
						b.Fatal("ring full")
					}
				}
				b.StartTimer()
				if err := vm.GetDirtyLog(0, bm); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
