//go:build amd64

package boot_test

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/boot"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

// TestBzImageBootsOnKVM boots the test bzImage on a VM the way a VMM boots
// Linux: LoadBzImage, Register, then the Entry's registers on vCPU 0. Its
// 64-bit entry (e820Walker) finds boot_params through RSI, reads the E820
// table the loader wrote, and touches every page of every usable entry.
// The count and the address sum it reports must be those of the layout —
// RAM below and above 4 GiB with the PCI hole and a gap between — computed
// from the layout alone: so the map, the identity map covering high RAM,
// the GDT, the segments and the long-mode state all work as loaded.
func TestBzImageBootsOnKVM(t *testing.T) {
	vm := testenv.VM(t)
	layout := guestmem.Layout{{GPA: 0, Size: 64 * kMiB}, {GPA: 4 * kGiB, Size: 64 * kMiB}}
	mem := newMem(t, layout)
	initrd := patternInitrd(64 * kKiB)
	e, err := boot.LoadBzImage(mem, bytes.NewReader(defaultBz(e820Walker(t)).bytes()), boot.Options{
		Cmdline: "console=ttyS0", Initrd: bytes.NewReader(initrd), InitrdSize: int64(len(initrd)),
	})
	require.NoError(t, err)
	require.NoError(t, mem.Register(vm))

	cpu, err := vm.CreateVCPU(0)
	require.NoError(t, err)
	t.Cleanup(func() { cpu.Close() })
	require.NoError(t, cpu.SetHostCPUID()) // KVM refuses long mode without it in CPUID
	base, err := cpu.Sregs()
	require.NoError(t, err)
	require.NoError(t, cpu.SetSregs(e.Sregs(base)))
	require.NoError(t, cpu.SetRegs(e.Regs))

	ports := map[uint16]uint32{}
	for done := false; !done; {
		ex, err := cpu.Run()
		require.NoError(t, err)
		switch {
		case ex.Reason == kvm.ExitIO && ex.IO.Out:
			ports[ex.IO.Port] = ex.IO.Value()
		case ex.Reason == kvm.ExitHLT:
			done = true
		default:
			regs, _ := cpu.Regs()
			t.Fatalf("unexpected exit %v at rip %#x", ex, regs.RIP)
		}
	}
	require.Contains(t, ports, uint16(guest.PortDone))
	pages, sum := walkOf(layout)
	require.Equal(t, uint32(len(e.E820)), ports[portEntries], "E820 entries the guest read")
	require.Equal(t, pages, uint64(ports[portCount+1])<<32|uint64(ports[portCount]), "pages the guest touched")
	require.Equal(t, sum, uint64(ports[portSum+1])<<32|uint64(ports[portSum]), "sum of their addresses")
	usable := 0
	for _, m := range e.E820 {
		if m.Type == boot.E820RAM {
			usable++
		}
	}
	t.Logf("the guest touched %d pages in %d usable E820 entries", pages, usable)
	// Touching wrote every word back unchanged.
	require.Equal(t, initrd, read(t, mem, e.Initrd.GPA, e.Initrd.Size))
}
