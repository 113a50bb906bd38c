//go:build amd64

package kvm_test

import (
	"errors"
	"sync"
	"testing"

	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

// AddSlot picks the slot number and creates the slot in one step, so
// goroutines adding slots at once never share a number (FreeSlot then
// SetSlot could hand two of them the same one, and the second replaced the
// first's slot).
func TestAddSlotConcurrent(t *testing.T) {
	vm := testenv.VM(t)
	mem := anon(t, 64*mib)
	const goroutines, each = 8, 16
	var wg sync.WaitGroup
	got := make([][]kvm.Slot, goroutines)
	errs := make([]error, goroutines)
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				k := uint64(g*each + i)
				s, err := vm.AddSlot(kvm.Slot{ID: 9999, GPA: k * 2 * mib, Size: 2 * mib,
					HostAddr: mem.Addr() + uintptr(k%32)*2*mib})
				if err != nil {
					errs[g] = err
					return
				}
				got[g] = append(got[g], s)
			}
		}()
	}
	wg.Wait()
	ids := map[uint32]uint64{}
	for g := range goroutines {
		if errs[g] != nil {
			t.Fatalf("goroutine %d: %v", g, errs[g])
		}
		for _, s := range got[g] {
			if prev, dup := ids[s.ID]; dup {
				t.Fatalf("slot %d given to %#x and %#x", s.ID, prev, s.GPA)
			}
			ids[s.ID] = s.GPA
			if cur, err := vm.Slot(s.ID); err != nil || cur.GPA != s.GPA {
				t.Fatalf("slot %d: %+v, %v; want the slot at %#x", s.ID, cur, err, s.GPA)
			}
		}
	}
	if len(vm.Slots()) != goroutines*each {
		t.Fatalf("%d slots, want %d", len(vm.Slots()), goroutines*each)
	}
	// A bad slot is refused as by SetSlot, with AddSlot's name and the
	// number it would have had (the lowest free one), not the ignored s.ID.
	_, err := vm.AddSlot(kvm.Slot{ID: 7, GPA: 0, Size: 2 * mib, HostAddr: mem.Addr()})
	wantSlotErr(t, "overlapping AddSlot", err, "AddSlot", goroutines*each, kvm.ErrSlotOverlap)
}

// OnClose hooks run at the start of Close, in order, while the VM still
// answers calls; a cancelled hook does not run; after Close, OnClose is
// ErrClosed.
func TestOnClose(t *testing.T) {
	vm, err := testenv.KVM(t).CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	mem := anon(t, 2*mib)
	s, err := vm.AddSlot(kvm.Slot{GPA: 0, Size: 2 * mib, HostAddr: mem.Addr(), Flags: kvm.LogDirtyPages})
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	_, err = vm.OnClose(func() {
		order = append(order, "first")
		bitmap := make([]uint64, kvm.DirtyBitmapWords(s.Pages()))
		if err := vm.GetDirtyLog(s.ID, bitmap); err != nil {
			t.Errorf("GetDirtyLog in the hook: %v", err)
		}
		if err := vm.DeleteSlot(s.ID); err != nil {
			t.Errorf("DeleteSlot in the hook: %v", err)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	cancel, err := vm.OnClose(func() { order = append(order, "cancelled") })
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if _, err := vm.OnClose(func() { order = append(order, "second") }); err != nil {
		t.Fatal(err)
	}
	if err := vm.Close(); err != nil {
		t.Fatal(err)
	}
	if len(order) != 2 || order[0] != "first" || order[1] != "second" {
		t.Fatalf("hooks ran %v; want [first second]", order)
	}
	if _, err := vm.OnClose(func() {}); !errors.Is(err, kvm.ErrClosed) {
		t.Fatalf("OnClose after Close = %v; want ErrClosed", err)
	}
	if err := vm.Close(); err != nil || len(order) != 2 {
		t.Fatalf("second Close = %v, hooks %v", err, order)
	}
}
