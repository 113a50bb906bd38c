//go:build amd64

package vmm

import gokvm "github.com/bobuhiro11/gokvm/kvm"

// CPUID bits the VMM sets.
const (
	cpuid1ECXHypervisor = 1 << 31 // leaf 1 ECX: running under a hypervisor
	maxCPUIDEntries     = 256     // room for KVM_GET_SUPPORTED_CPUID's answer
)

// normalizeCPUID edits the CPUID table KVM supports on this host
// (KVM_GET_SUPPORTED_CPUID) into the table of vCPU apicID: what the kernel
// command line cannot restrict, since it is about the machine rather than a
// feature the kernel may leave unused.
//
//   - Leaf 1 ECX bit 31, "hypervisor": the kernel then knows it runs in a
//     VM and looks for KVM's paravirtual leaves (kvm-clock).
//   - The vCPU's APIC ID: leaf 1 EBX bits 31:24 (initial APIC ID) and the
//     x2APIC ID in EDX of leaves 0xB and 0x1F, each subleaf. KVM reports
//     the host CPU's there.
//
// Features are not removed here. Where KVM runs guests with hardware
// virtualization the table is what the guest sees, and it lists only what
// KVM can run; where it does not (KVM's emulator on such a host), the guest
// sees host-like CPUID whatever the table says, and EmulatorCmdline
// restricts the kernel instead.
func normalizeCPUID(entries []gokvm.CPUIDEntry2, apicID uint32) {
	for i := range entries {
		e := &entries[i]
		switch e.Function {
		case 1:
			e.Ecx |= cpuid1ECXHypervisor
			e.Ebx = e.Ebx&0x00ffffff | apicID<<24
		case 0xb, 0x1f:
			e.Edx = apicID
		}
	}
}
