//go:build amd64

package boot_test

import (
	"fmt"
	"log"
	"os"

	"github.com/gmem-vmm/gmem/boot"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/kvm"
)

// Booting Linux on a VM: guest memory, the kernel loaded into it with
// Load (a bzImage or a vmlinux, found by its magic), the memory registered
// with KVM, and vCPU 0 given the Entry's registers. The VMM then runs the
// vCPU and serves its exits (a serial port at 0x3f8 to see the kernel
// talk). Not run as a test: it needs a kernel and /dev/kvm.
func Example() {
	mem, err := guestmem.New(guestmem.X86Layout(1 << 30))
	if err != nil {
		log.Fatal(err)
	}
	defer mem.Close()

	kernel, err := os.Open("/boot/vmlinuz")
	if err != nil {
		log.Fatal(err)
	}
	defer kernel.Close()
	initrd, err := os.Open("/boot/initrd.img")
	if err != nil {
		log.Fatal(err)
	}
	defer initrd.Close()
	st, err := initrd.Stat()
	if err != nil {
		log.Fatal(err)
	}
	entry, err := boot.Load(mem, kernel, boot.Options{
		Cmdline: "console=ttyS0 panic=-1",
		Initrd:  initrd, InitrdSize: st.Size(),
	})
	if err != nil {
		log.Fatal(err) // a *boot.ImageError says what is wrong with which file
	}
	fmt.Printf("%v: entry %#x, initrd at %v\n", entry.Protocol, entry.Regs.RIP, entry.Initrd.GPA)

	dev, err := kvm.Open("")
	if err != nil {
		log.Fatal(err)
	}
	defer dev.Close()
	vm, err := dev.CreateVM()
	if err != nil {
		log.Fatal(err)
	}
	defer vm.Close()
	if err := mem.Register(vm); err != nil {
		log.Fatal(err)
	}
	cpu, err := vm.CreateVCPU(0)
	if err != nil {
		log.Fatal(err)
	}
	if err := cpu.SetHostCPUID(); err != nil {
		log.Fatal(err)
	}
	sregs, err := cpu.Sregs()
	if err != nil {
		log.Fatal(err)
	}
	if err := cpu.SetSregs(entry.Sregs(sregs)); err != nil {
		log.Fatal(err)
	}
	if err := cpu.SetRegs(entry.Regs); err != nil {
		log.Fatal(err)
	}
	// ... cpu.Run() in a loop, serving I/O exits.
}

// The memory map a guest of 5 GiB is given: RAM below the PCI hole and from
// 4 GiB, the BIOS area and the hole reserved.
func ExampleMemoryMap() {
	m, err := boot.MemoryMap(guestmem.X86Layout(5 << 30))
	if err != nil {
		log.Fatal(err)
	}
	for _, e := range m {
		fmt.Printf("[mem 0x%016x-0x%016x] %v\n", uint64(e.GPA), uint64(e.End())-1, e.Type)
	}
	// Output:
	// [mem 0x0000000000000000-0x000000000009fbff] usable
	// [mem 0x000000000009fc00-0x00000000000fffff] reserved
	// [mem 0x0000000000100000-0x00000000bfffffff] usable
	// [mem 0x00000000c0000000-0x00000000ffffffff] reserved
	// [mem 0x0000000100000000-0x000000017fffffff] usable
}
