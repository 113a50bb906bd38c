package kvm_test

import (
	"fmt"
	"testing"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

// BenchmarkSetSlot registers and deletes one slot (SetSlot + DeleteSlot)
// over untouched MAP_NORESERVE memory, with and without dirty logging:
// the cost of adding or removing RAM, which grows with the slot's size
// (per-page metadata, and the dirty bitmap when logging).
func BenchmarkSetSlot(b *testing.B) {
	for _, gibs := range []int64{1, 16, 64} {
		for _, flags := range []kvm.SlotFlags{0, kvm.LogDirtyPages} {
			b.Run(fmt.Sprintf("%dGiB/%v", gibs, flags), func(b *testing.B) {
				vm := testenv.VM(b)
				size := gibs << 30
				ram, err := arena.NewAnon(size, arena.NoReserve())
				if err != nil {
					b.Fatal(err)
				}
				defer ram.Close()
				s := kvm.Slot{ID: 0, GPA: 1 << 32, Size: uint64(size), HostAddr: ram.Addr(), Flags: flags}
				for b.Loop() {
					if err := vm.SetSlot(s); err != nil {
						b.Fatal(err)
					}
					if err := vm.DeleteSlot(s.ID); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkGetDirtyLog reads the dirty bitmap of a 4 GiB slot (1 Mi pages,
// 128 KiB of bitmap) with nothing dirty: the fixed cost of one collection
// round. "reset" is the default mode, where KVM also clears the log and
// write-protects what was dirty; "manual" has manual dirty-log protect on,
// where GetDirtyLog only reads.
func BenchmarkGetDirtyLog(b *testing.B) {
	for _, manual := range []bool{false, true} {
		name := "reset"
		if manual {
			name = "manual"
		}
		b.Run("4GiB/"+name, func(b *testing.B) {
			vm := testenv.VM(b)
			if manual {
				if !vm.Capabilities().ManualDirtyLog {
					b.Skip("no manual dirty-log protect")
				}
				if err := vm.EnableManualDirtyLog(); err != nil {
					b.Fatal(err)
				}
			}
			const size = 4 << 30
			ram, err := arena.NewAnon(size, arena.NoReserve())
			if err != nil {
				b.Fatal(err)
			}
			defer ram.Close()
			s := kvm.Slot{ID: 0, GPA: 1 << 32, Size: size, HostAddr: ram.Addr(), Flags: kvm.LogDirtyPages}
			if err := vm.SetSlot(s); err != nil {
				b.Fatal(err)
			}
			defer vm.DeleteSlot(s.ID)
			bitmap := make([]uint64, kvm.DirtyBitmapWords(s.Pages()))
			b.SetBytes(int64(len(bitmap)) * 8)
			for b.Loop() {
				if err := vm.GetDirtyLog(s.ID, bitmap); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
