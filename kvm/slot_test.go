//go:build amd64

package kvm_test

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"

	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

func TestDirtyBitmapSize(t *testing.T) {
	for _, c := range []struct{ pages, bytes, words uint64 }{
		{0, 0, 0}, {1, 1, 1}, {7, 1, 1}, {8, 1, 1}, {9, 2, 1}, {63, 8, 1}, {64, 8, 1}, {65, 9, 2}, {100, 13, 2},
		{128, 16, 2}, {1 << 20, 1 << 17, 1 << 14},
		{kvm.MaxSlotPages, 1 << 28, 1 << 25},
		// No overflow at the top of the range.
		{math.MaxUint64, 1 << 61, 1 << 58},
	} {
		if got := kvm.DirtyBitmapBytes(c.pages); got != c.bytes {
			t.Errorf("DirtyBitmapBytes(%d) = %d, want %d", c.pages, got, c.bytes)
		}
		if got := kvm.DirtyBitmapWords(c.pages); got != c.words {
			t.Errorf("DirtyBitmapWords(%d) = %d, want %d", c.pages, got, c.words)
		}
	}
}

// wantSlotErr checks that err is a *SlotError for op and slot wrapping
// sentinel.
func wantSlotErr(t *testing.T, what string, err error, op string, slot uint32, sentinel error) {
	t.Helper()
	var se *kvm.SlotError
	if !errors.Is(err, sentinel) || !errors.As(err, &se) || se.Op != op || se.Slot != slot {
		t.Errorf("%s: err = %v, want a %s *SlotError for slot %d wrapping %q", what, err, op, slot, sentinel)
	}
}

// TestSlotRefusals: the table refuses each bad slot with its own sentinel
// before the kernel sees it, and leaves the table as it was.
func TestSlotRefusals(t *testing.T) {
	vm := testenv.VM(t)
	host := anon(t, 8*mib)
	h := host.Addr()
	existing := kvm.Slot{ID: 0, GPA: 16 * mib, Size: 4 * mib, HostAddr: h}
	if err := vm.SetSlot(existing); err != nil {
		t.Fatal(err)
	}
	max := uint32(vm.MaxSlots())
	for _, c := range []struct {
		name string
		s    kvm.Slot
		want error
	}{
		{"slot number = MaxSlots", kvm.Slot{ID: max, GPA: 0, Size: mib, HostAddr: h}, kvm.ErrSlotLimit},
		{"slot number 2^32-1", kvm.Slot{ID: math.MaxUint32, GPA: 0, Size: mib, HostAddr: h}, kvm.ErrSlotLimit},
		{"slot number in address space 1", kvm.Slot{ID: 1 << 16, GPA: 0, Size: mib, HostAddr: h}, kvm.ErrSlotLimit},
		{"overlaps the start", kvm.Slot{ID: 1, GPA: 15 * mib, Size: 2 * mib, HostAddr: h}, kvm.ErrSlotOverlap},
		{"overlaps the end", kvm.Slot{ID: 1, GPA: 19 * mib, Size: 2 * mib, HostAddr: h}, kvm.ErrSlotOverlap},
		{"inside", kvm.Slot{ID: 1, GPA: 17 * mib, Size: page, HostAddr: h}, kvm.ErrSlotOverlap},
		{"covers", kvm.Slot{ID: 1, GPA: 0, Size: 64 * mib, HostAddr: h}, kvm.ErrSlotOverlap},
		{"same range", kvm.Slot{ID: 1, GPA: 16 * mib, Size: 4 * mib, HostAddr: h}, kvm.ErrSlotOverlap},
		{"last page", kvm.Slot{ID: 1, GPA: 20*mib - page, Size: page, HostAddr: h}, kvm.ErrSlotOverlap},
		{"unaligned guest address", kvm.Slot{ID: 1, GPA: 100, Size: mib, HostAddr: h}, kvm.ErrSlotUnaligned},
		{"unaligned size", kvm.Slot{ID: 1, GPA: 0, Size: mib + 1, HostAddr: h}, kvm.ErrSlotUnaligned},
		{"unaligned host address", kvm.Slot{ID: 1, GPA: 0, Size: mib, HostAddr: h + 8}, kvm.ErrSlotUnaligned},
		{"zero size", kvm.Slot{ID: 1, GPA: 0, Size: 0, HostAddr: h}, kvm.ErrSlotSize},
		{"guest range overflows", kvm.Slot{ID: 1, GPA: math.MaxUint64 - mib + 1, Size: 2 * mib, HostAddr: h},
			kvm.ErrSlotSize},
		{"host range overflows", kvm.Slot{ID: 1, GPA: 0, Size: 2 * mib, HostAddr: math.MaxUint64 - mib + 1},
			kvm.ErrSlotSize},
		{"host address 0", kvm.Slot{ID: 1, GPA: 0, Size: mib, HostAddr: 0}, kvm.ErrSlotSize},
		{"more pages than KVM allows", kvm.Slot{ID: 1, GPA: 0, Size: (kvm.MaxSlotPages + 1) * page, HostAddr: h},
			kvm.ErrSlotSize},
		{"unknown flag", kvm.Slot{ID: 1, GPA: 0, Size: mib, HostAddr: h, Flags: 1 << 2}, kvm.ErrSlotFlags},
	} {
		err := vm.SetSlot(c.s)
		wantSlotErr(t, c.name, err, "SetSlot", c.s.ID, c.want)
		if got := vm.Slots(); !slices.Equal(got, []kvm.Slot{existing}) {
			t.Fatalf("%s: a refused SetSlot changed the table: %+v", c.name, got)
		}
	}
	// Neighbours touching the slot are fine.
	for i, gpa := range []uint64{16*mib - page, 20 * mib} {
		if err := vm.SetSlot(kvm.Slot{ID: uint32(1 + i), GPA: gpa, Size: page, HostAddr: h}); err != nil {
			t.Errorf("adjacent slot at %#x: %v", gpa, err)
		}
	}
	// The last slot number is accepted. (The largest slot size is not
	// registered here: KVM allocates per-page metadata for a slot, and an
	// 8 TiB slot took over 10 s to register in a trial. The kernel's own
	// limit is checked in TestKernelAgreesOnSlotLimit.)
	if err := vm.SetSlot(kvm.Slot{ID: max - 1, GPA: gib, Size: mib, HostAddr: h}); err != nil {
		t.Errorf("last slot number: %v", err)
	}
}

func TestUnknownSlot(t *testing.T) {
	vm := testenv.VM(t)
	wantSlotErr(t, "DeleteSlot", vm.DeleteSlot(5), "DeleteSlot", 5, kvm.ErrNoSlot)
	wantSlotErr(t, "GetDirtyLog", vm.GetDirtyLog(5, make([]uint64, 1)), "GetDirtyLog", 5, kvm.ErrNoSlot)
	wantSlotErr(t, "ClearDirtyLog", vm.ClearDirtyLog(5, 0, 1, make([]uint64, 1)), "ClearDirtyLog", 5, kvm.ErrNoSlot)
	_, err := vm.Slot(5)
	wantSlotErr(t, "Slot", err, "Slot", 5, kvm.ErrNoSlot)
	host := anon(t, mib)
	if err := vm.SetSlot(kvm.Slot{ID: 5, GPA: 0, Size: mib, HostAddr: host.Addr()}); err != nil {
		t.Fatal(err)
	}
	if err := vm.DeleteSlot(5); err != nil {
		t.Fatal(err)
	}
	wantSlotErr(t, "second DeleteSlot", vm.DeleteSlot(5), "DeleteSlot", 5, kvm.ErrNoSlot)
}

func TestDirtyLogRefusals(t *testing.T) {
	vm := testenv.VM(t)
	host := anon(t, mib)
	if err := vm.SetSlot(kvm.Slot{ID: 0, GPA: 0, Size: 100 * page, HostAddr: host.Addr()}); err != nil {
		t.Fatal(err)
	}
	wantSlotErr(t, "GetDirtyLog without logging", vm.GetDirtyLog(0, make([]uint64, 2)), "GetDirtyLog", 0,
		kvm.ErrNotLogging)
	if err := vm.SetSlot(kvm.Slot{ID: 0, GPA: 0, Size: 100 * page, HostAddr: host.Addr(),
		Flags: kvm.LogDirtyPages}); err != nil {
		t.Fatal(err)
	}
	// 100 pages need 2 words (the kernel copies whole words, 16 bytes,
	// although 13 would hold the bits).
	for _, n := range []int{0, 1} {
		wantSlotErr(t, fmt.Sprintf("%d-word bitmap", n), vm.GetDirtyLog(0, make([]uint64, n)), "GetDirtyLog", 0,
			kvm.ErrBitmapTooSmall)
	}
	if err := vm.GetDirtyLog(0, make([]uint64, 2)); err != nil {
		t.Fatalf("2-word bitmap: %v", err)
	}
	// ClearDirtyLog needs manual protect.
	wantSlotErr(t, "ClearDirtyLog without manual protect", vm.ClearDirtyLog(0, 0, 100, make([]uint64, 2)),
		"ClearDirtyLog", 0, kvm.ErrUnsupported)
	// Turning logging off makes the slot's log go away.
	if err := vm.SetSlot(kvm.Slot{ID: 0, GPA: 0, Size: 100 * page, HostAddr: host.Addr()}); err != nil {
		t.Fatal(err)
	}
	wantSlotErr(t, "GetDirtyLog after logging was turned off", vm.GetDirtyLog(0, make([]uint64, 2)),
		"GetDirtyLog", 0, kvm.ErrNotLogging)
}

func TestClearDirtyLogRanges(t *testing.T) {
	vm := testenv.VM(t)
	if !vm.Capabilities().ManualDirtyLog {
		testenv.Skip(t, "no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
	}
	if err := vm.EnableManualDirtyLog(); err != nil {
		t.Fatal(err)
	}
	if !vm.ManualDirtyLog() {
		t.Fatal("ManualDirtyLog false after EnableManualDirtyLog")
	}
	host := anon(t, mib)
	if err := vm.SetSlot(kvm.Slot{ID: 2, GPA: 0, Size: 200 * page, HostAddr: host.Addr(),
		Flags: kvm.LogDirtyPages}); err != nil {
		t.Fatal(err)
	}
	bm := make([]uint64, 4)
	for _, c := range []struct {
		first, n uint64
		bitmap   []uint64
		want     error
	}{
		{0, 200, bm, nil},     // the whole slot
		{64, 64, bm, nil},     // one aligned block
		{128, 72, bm, nil},    // a short count that reaches the end
		{192, 8, bm[:1], nil}, // the last partial word
		{0, 0, bm, kvm.ErrSlotSize},
		{0, 201, bm, kvm.ErrSlotSize},
		{256, 64, bm, kvm.ErrSlotSize},
		{math.MaxUint64 - 63, 64, bm, kvm.ErrSlotSize},
		{1, 64, bm, kvm.ErrSlotUnaligned},
		{0, 10, bm, kvm.ErrSlotUnaligned},
		{0, 200, bm[:3], kvm.ErrBitmapTooSmall},
		{0, 64, nil, kvm.ErrBitmapTooSmall},
	} {
		err := vm.ClearDirtyLog(2, c.first, c.n, c.bitmap)
		what := fmt.Sprintf("ClearDirtyLog(first %d, n %d, %d words)", c.first, c.n, len(c.bitmap))
		if c.want == nil {
			if err != nil {
				t.Errorf("%s: %v", what, err)
			}
			continue
		}
		wantSlotErr(t, what, err, "ClearDirtyLog", 2, c.want)
	}
}

// TestUseAfterClose: every VM and vCPU method refuses with ErrClosed.
func TestUseAfterClose(t *testing.T) {
	d := testenv.KVM(t)
	vm, err := d.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	host := anon(t, mib)
	if err := vm.SetSlot(kvm.Slot{ID: 1, GPA: 0, Size: mib, HostAddr: host.Addr(), Flags: kvm.LogDirtyPages}); err != nil {
		t.Fatal(err)
	}
	c, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.Close(); err != nil {
		t.Fatal(err)
	}
	if err := vm.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	wantSlotErr(t, "SetSlot", vm.SetSlot(kvm.Slot{ID: 2, GPA: gib, Size: mib, HostAddr: host.Addr()}), "SetSlot", 2,
		kvm.ErrClosed)
	wantSlotErr(t, "DeleteSlot", vm.DeleteSlot(1), "DeleteSlot", 1, kvm.ErrClosed)
	wantSlotErr(t, "GetDirtyLog", vm.GetDirtyLog(1, make([]uint64, 4)), "GetDirtyLog", 1, kvm.ErrClosed)
	wantSlotErr(t, "ClearDirtyLog", vm.ClearDirtyLog(1, 0, 256, make([]uint64, 4)), "ClearDirtyLog", 1, kvm.ErrClosed)
	_, err = vm.Slot(1)
	wantSlotErr(t, "Slot", err, "Slot", 1, kvm.ErrClosed)
	if _, err := vm.FreeSlot(); !errors.Is(err, kvm.ErrClosed) {
		t.Errorf("FreeSlot: %v", err)
	}
	if err := vm.EnableManualDirtyLog(); !errors.Is(err, kvm.ErrClosed) {
		t.Errorf("EnableManualDirtyLog: %v", err)
	}
	if _, err := vm.CreateVCPU(1); !errors.Is(err, kvm.ErrClosed) {
		t.Errorf("CreateVCPU: %v", err)
	}
	if s := vm.Slots(); len(s) != 0 {
		t.Errorf("Slots after Close: %+v", s)
	}
	if _, ok := vm.SlotAt(0); ok {
		t.Error("SlotAt found a slot after Close")
	}
	// VM.Close closed the vCPU.
	if _, err := c.Run(); !errors.Is(err, kvm.ErrClosed) {
		t.Errorf("Run: %v", err)
	}
	if _, err := c.Regs(); !errors.Is(err, kvm.ErrClosed) {
		t.Errorf("Regs: %v", err)
	}
	if err := c.SetRegs(kvm.Regs{}); !errors.Is(err, kvm.ErrClosed) {
		t.Errorf("SetRegs: %v", err)
	}
	if _, err := c.Sregs(); !errors.Is(err, kvm.ErrClosed) {
		t.Errorf("Sregs: %v", err)
	}
	if err := c.SetSregs(kvm.Sregs{}); !errors.Is(err, kvm.ErrClosed) {
		t.Errorf("SetSregs: %v", err)
	}
	if err := c.SetHostCPUID(); !errors.Is(err, kvm.ErrClosed) {
		t.Errorf("SetHostCPUID: %v", err)
	}
	if err := c.Complete(); !errors.Is(err, kvm.ErrClosed) {
		t.Errorf("Complete: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("vCPU Close after VM Close: %v", err)
	}
}

// TestSetSlotMove moves a slot (same size and host memory, new guest
// address): KVM does it in place, and the table follows.
func TestSetSlotMove(t *testing.T) {
	vm := testenv.VM(t)
	host := anon(t, 4*mib)
	s := kvm.Slot{ID: 3, GPA: gib, Size: 4 * mib, HostAddr: host.Addr()}
	if err := vm.SetSlot(s); err != nil {
		t.Fatal(err)
	}
	// Onto a range overlapping its own old one: only other slots count.
	s.GPA += mib
	if err := vm.SetSlot(s); err != nil {
		t.Fatalf("move by 1 MiB: %v", err)
	}
	if got, _ := vm.Slot(3); got != s {
		t.Fatalf("after the move the table says %+v, want %+v", got, s)
	}
	s.GPA = 2 * gib
	if err := vm.SetSlot(s); err != nil {
		t.Fatal(err)
	}
	// The old range is free again.
	if err := vm.SetSlot(kvm.Slot{ID: 4, GPA: gib, Size: 4 * mib, HostAddr: host.Addr()}); err != nil {
		t.Fatalf("slot at the old range: %v", err)
	}
	// A move onto another slot is refused, and the slot stays put.
	bad := s
	bad.GPA = gib + 2*mib
	wantSlotErr(t, "move onto slot 4", vm.SetSlot(bad), "SetSlot", 3, kvm.ErrSlotOverlap)
	if got, _ := vm.Slot(3); got != s {
		t.Fatalf("a refused move changed the slot: %+v", got)
	}
	if got := vm.Slots(); len(got) != 2 || got[0].ID != 4 || got[1].ID != 3 {
		t.Fatalf("Slots = %+v, want slot 4 then 3", got)
	}
}

// TestSetSlotResize changes what KVM cannot change in place (size, host
// address, the read-only flag): SetSlot deletes and recreates the slot.
func TestSetSlotResize(t *testing.T) {
	vm := testenv.VM(t)
	host := anon(t, 8*mib)
	s := kvm.Slot{ID: 0, GPA: 0, Size: 4 * mib, HostAddr: host.Addr()}
	for i, next := range []kvm.Slot{
		{ID: 0, GPA: 0, Size: 8 * mib, HostAddr: host.Addr()},                              // grow
		{ID: 0, GPA: 0, Size: 2 * mib, HostAddr: host.Addr()},                              // shrink
		{ID: 0, GPA: 0, Size: 2 * mib, HostAddr: host.Addr() + 2*mib},                      // other host memory
		{ID: 0, GPA: 0, Size: 2 * mib, HostAddr: host.Addr() + 2*mib, Flags: kvm.ReadOnly}, // read-only on
		{ID: 0, GPA: 0, Size: 2 * mib, HostAddr: host.Addr() + 2*mib},                      // and off
		{ID: 0, GPA: gib, Size: 4 * mib, HostAddr: host.Addr(), Flags: kvm.ReadOnly | kvm.LogDirtyPages},
		{ID: 0, GPA: gib, Size: 4 * mib, HostAddr: host.Addr(), Flags: kvm.ReadOnly}, // logging off in place
	} {
		if next.Flags&kvm.ReadOnly != 0 && !vm.Capabilities().ReadonlyMem {
			continue
		}
		if err := vm.SetSlot(next); err != nil {
			t.Fatalf("change %d, %+v -> %+v: %v", i, s, next, err)
		}
		if got := vm.Slots(); !slices.Equal(got, []kvm.Slot{next}) {
			t.Fatalf("change %d: Slots = %+v, want %+v", i, got, next)
		}
		s = next
	}
}

// TestSetSlotRestoresOnFailure: when the kernel refuses the new version of
// a slot SetSlot had to delete, the old slot is put back.
func TestSetSlotRestoresOnFailure(t *testing.T) {
	vm := testenv.VM(t)
	host := anon(t, 4*mib)
	old := kvm.Slot{ID: 7, GPA: gib, Size: 4 * mib, HostAddr: host.Addr()}
	if err := vm.SetSlot(old); err != nil {
		t.Fatal(err)
	}
	// Host memory outside user space passes the table's checks; the
	// kernel refuses it (EINVAL) after the old slot is gone.
	bad := old
	bad.HostAddr = 1 << 62
	err := vm.SetSlot(bad)
	var se *kvm.SlotError
	if !errors.As(err, &se) || se.Slot != 7 || err == nil {
		t.Fatalf("SetSlot with a kernel-space host address: %v", err)
	}
	t.Log(err)
	if got, err := vm.Slot(7); err != nil || got != old {
		t.Fatalf("slot 7 after the failed change: %+v, %v; want the old slot back", got, err)
	}
	// The kernel has it back too: deleting a slot it does not have is
	// EINVAL.
	if err := vm.DeleteSlot(7); err != nil {
		t.Fatalf("deleting the restored slot: %v", err)
	}
}

func TestSlotsSortedAndSlotAt(t *testing.T) {
	vm := testenv.VM(t)
	host := anon(t, 4*mib)
	gpas := []uint64{3 * gib, 0, 5 * gib, gib, 2 * gib}
	for i, gpa := range gpas {
		if err := vm.SetSlot(kvm.Slot{ID: uint32(10 + i), GPA: gpa, Size: mib, HostAddr: host.Addr()}); err != nil {
			t.Fatal(err)
		}
	}
	got := vm.Slots()
	if !slices.IsSortedFunc(got, func(a, b kvm.Slot) int { return int(a.GPA>>20) - int(b.GPA>>20) }) ||
		len(got) != len(gpas) {
		t.Fatalf("Slots not sorted by GPA: %+v", got)
	}
	for _, c := range []struct {
		gpa  uint64
		id   uint32
		want bool
	}{
		{0, 11, true}, {mib - 1, 11, true}, {mib, 0, false}, {gib - 1, 0, false}, {gib, 13, true},
		{3*gib + mib/2, 10, true}, {5*gib + mib - 1, 12, true}, {5*gib + mib, 0, false}, {math.MaxUint64, 0, false},
	} {
		s, ok := vm.SlotAt(c.gpa)
		if ok != c.want || (ok && s.ID != c.id) {
			t.Errorf("SlotAt(%#x) = %+v, %v; want slot %d, %v", c.gpa, s, ok, c.id, c.want)
		}
	}
	if id, err := vm.FreeSlot(); err != nil || id != 0 {
		t.Errorf("FreeSlot = %d, %v; want 0", id, err)
	}
}

// TestSlotTableConcurrent changes disjoint slots from several goroutines
// while others read the table (run under -race).
func TestSlotTableConcurrent(t *testing.T) {
	vm := testenv.VM(t)
	host := anon(t, mib)
	var wg sync.WaitGroup
	const workers, rounds = 8, 50
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			for r := range rounds {
				id := uint32(w*2 + r%2)
				s := kvm.Slot{ID: id, GPA: uint64(id) * gib, Size: mib, HostAddr: host.Addr()}
				if r%3 == 0 {
					s.GPA += 2 * mib // a move
				}
				if err := vm.SetSlot(s); err != nil {
					errs <- err
					return
				}
				if _, ok := vm.SlotAt(s.GPA); !ok {
					errs <- fmt.Errorf("slot %d not found at %#x", id, s.GPA)
					return
				}
				_ = vm.Slots()
				if r%5 == 4 {
					if err := vm.DeleteSlot(id); err != nil {
						errs <- err
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, s := range vm.Slots() {
		if got, ok := vm.SlotAt(s.GPA); !ok || got != s {
			t.Errorf("table inconsistent: %+v vs %+v", s, got)
		}
	}
}

// TestSlotTableMatchesModel applies random slot changes to a VM and to a
// plain model (a map and linear scans). The table must accept and refuse
// exactly what the model does, the kernel must accept everything the
// table accepts (an errno would mean the table let a bad change through),
// and Slots and SlotAt must agree with the model after every step.
func TestSlotTableMatchesModel(t *testing.T) {
	vm := testenv.VM(t)
	host := anon(t, 16*page)
	rng := rand.New(rand.NewPCG(7, 11))
	model := map[uint32]kvm.Slot{}
	ro := vm.Capabilities().ReadonlyMem
	counts := map[string]int{}
	for step := range 3000 {
		id := uint32(rng.IntN(12))
		var err, want error
		op := "delete"
		if rng.IntN(4) > 0 {
			op = "set"
			s := kvm.Slot{ID: id, GPA: uint64(rng.IntN(96)) * page, Size: uint64(1+rng.IntN(8)) * page,
				HostAddr: host.Addr() + uintptr(rng.IntN(8))*page}
			if rng.IntN(3) == 0 {
				s.Flags |= kvm.LogDirtyPages
			}
			if ro && rng.IntN(4) == 0 {
				s.Flags |= kvm.ReadOnly
			}
			for oid, o := range model {
				if oid != id && s.GPA < o.End() && o.GPA < s.End() {
					want = kvm.ErrSlotOverlap
				}
			}
			if err = vm.SetSlot(s); want == nil && err == nil {
				model[id] = s
			}
		} else {
			if _, ok := model[id]; !ok {
				want = kvm.ErrNoSlot
			}
			if err = vm.DeleteSlot(id); err == nil {
				delete(model, id)
			}
		}
		if (want == nil) != (err == nil) || (want != nil && !errors.Is(err, want)) {
			t.Fatalf("step %d, %s slot %d: err = %v, want %v", step, op, id, err, want)
		}
		counts[fmt.Sprintf("%s %v", op, want)]++
		got := vm.Slots()
		if len(got) != len(model) {
			t.Fatalf("step %d: table %+v, model %+v", step, got, model)
		}
		for _, s := range got {
			if model[s.ID] != s {
				t.Fatalf("step %d: table has %+v, model %+v", step, s, model[s.ID])
			}
		}
		gpa := uint64(rng.IntN(110 * page))
		var inModel *kvm.Slot
		for _, o := range model {
			if o.GPA <= gpa && gpa < o.End() {
				inModel = &o
			}
		}
		if s, ok := vm.SlotAt(gpa); ok != (inModel != nil) || (ok && s != *inModel) {
			t.Fatalf("step %d: SlotAt(%#x) = %+v, %v; model %+v", step, gpa, s, ok, inModel)
		}
	}
	t.Logf("operations by expected outcome: %v", counts)
}

// A slot inserted after a vCPU entered the guest (generation gen) must not
// turn that run's MMIO exit into a memory fault: KVM may have decided on the
// exit before the slot existed. tests/TestHotplugWhileGuestRuns hit this.
func TestSlotGenerationForMMIOClassification(t *testing.T) {
	vm := testenv.VM(t)
	host := anon(t, 2*mib)
	if err := vm.SetSlot(kvm.Slot{ID: 1, GPA: 0, Size: mib, HostAddr: host.Addr()}); err != nil {
		t.Fatal(err)
	}
	gen := vm.Generation()
	if _, ok := vm.SlotAtSince(0x1000, gen); !ok {
		t.Fatal("a slot present at entry counts")
	}
	if err := vm.SetSlot(kvm.Slot{ID: 2, GPA: 4 * mib, Size: mib, HostAddr: host.Addr() + mib}); err != nil {
		t.Fatal(err)
	}
	if _, ok := vm.SlotAtSince(4*mib, gen); ok {
		t.Error("a slot added after entry counts")
	}
	if _, ok := vm.SlotAtSince(4*mib, vm.Generation()); !ok {
		t.Error("the added slot does not count for a later run")
	}
	// Recreating slot 1 (a host-address change deletes and re-adds it) makes
	// it new too: the guest saw no memory there for a moment.
	if err := vm.SetSlot(kvm.Slot{ID: 1, GPA: 0, Size: mib, HostAddr: host.Addr() + mib}); err != nil {
		t.Fatal(err)
	}
	if _, ok := vm.SlotAtSince(0x1000, gen); ok {
		t.Error("a recreated slot counts as present at entry")
	}
}
