package kvm_test

import (
	"errors"
	"fmt"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/kvm"
)

// Open the KVM device, create a VM, give it a slot of guest memory, and
// see the slot table refuse a slot number beyond the kernel's limit. (The
// output is the same on every KVM host; where there is no /dev/kvm the
// example is not run.)
func Example() {
	d, err := kvm.Open("") // /dev/kvm; checks KVM_GET_API_VERSION
	if err != nil {
		fmt.Println(err) // ErrNoDevice or ErrPermission, saying what to do
		return
	}
	defer d.Close()
	fmt.Println("KVM API version", kvm.APIVersion, "accepted")

	vm, err := d.CreateVM()
	if err != nil {
		fmt.Println(err)
		return
	}
	defer vm.Close() // before ram.Close below: KVM lets go of the memory first

	ram, err := arena.NewAnon(2<<20, arena.NoReserve())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer ram.Close()

	err = vm.SetSlot(kvm.Slot{ID: 0, GPA: 0x100000, Size: 2 << 20, HostAddr: ram.Addr(), Flags: kvm.LogDirtyPages})
	fmt.Println("slot 0:", err)
	for _, s := range vm.Slots() {
		fmt.Printf("guest [%#x, %#x) %v, dirty bitmap %d words\n", s.GPA, s.End(), s.Flags,
			kvm.DirtyBitmapWords(s.Pages()))
	}

	err = vm.SetSlot(kvm.Slot{ID: uint32(vm.MaxSlots()), GPA: 1 << 30, Size: 2 << 20, HostAddr: ram.Addr()})
	fmt.Println("slot MaxSlots():", errors.Is(err, kvm.ErrSlotLimit))
	// Output:
	// KVM API version 12 accepted
	// slot 0: <nil>
	// guest [0x100000, 0x300000) log-dirty, dirty bitmap 8 words
	// slot MaxSlots(): true
}
