//go:build amd64

package kvm_test

import (
	"testing"

	"github.com/gmem-vmm/gmem/kvm"
)

// TestRegisterBits checks each control-register, EFER and RFLAGS constant
// against its bit position in the Intel SDM (Vol. 3A §2.5 for CR0 and CR4,
// §2.2.1 for EFER; Vol. 1 §3.4.3 for RFLAGS), the positions Linux's
// asm/processor-flags.h repeats as X86_CR0_PE_BIT and so on: each constant
// is that one bit, and no two constants of a register share it.
func TestRegisterBits(t *testing.T) {
	type bit struct {
		name  string
		value uint64
		pos   uint
	}
	for reg, bits := range map[string][]bit{
		"CR0": {
			{"PE", kvm.CR0PE, 0}, {"MP", kvm.CR0MP, 1}, {"EM", kvm.CR0EM, 2}, {"TS", kvm.CR0TS, 3},
			{"ET", kvm.CR0ET, 4}, {"NE", kvm.CR0NE, 5}, {"WP", kvm.CR0WP, 16}, {"AM", kvm.CR0AM, 18},
			{"NW", kvm.CR0NW, 29}, {"CD", kvm.CR0CD, 30}, {"PG", kvm.CR0PG, 31},
		},
		"CR4": {
			{"VME", kvm.CR4VME, 0}, {"PVI", kvm.CR4PVI, 1}, {"TSD", kvm.CR4TSD, 2}, {"DE", kvm.CR4DE, 3},
			{"PSE", kvm.CR4PSE, 4}, {"PAE", kvm.CR4PAE, 5}, {"MCE", kvm.CR4MCE, 6}, {"PGE", kvm.CR4PGE, 7},
			{"PCE", kvm.CR4PCE, 8}, {"OSFXSR", kvm.CR4OSFXSR, 9}, {"OSXMMEXCPT", kvm.CR4OSXMMEXCPT, 10},
			{"UMIP", kvm.CR4UMIP, 11}, {"LA57", kvm.CR4LA57, 12}, {"VMXE", kvm.CR4VMXE, 13},
			{"FSGSBASE", kvm.CR4FSGSBASE, 16}, {"PCIDE", kvm.CR4PCIDE, 17}, {"OSXSAVE", kvm.CR4OSXSAVE, 18},
			{"SMEP", kvm.CR4SMEP, 20}, {"SMAP", kvm.CR4SMAP, 21}, {"PKE", kvm.CR4PKE, 22},
		},
		"EFER": {
			{"SCE", kvm.EFERSCE, 0}, {"LME", kvm.EFERLME, 8}, {"LMA", kvm.EFERLMA, 10}, {"NXE", kvm.EFERNXE, 11},
		},
		"RFLAGS": {
			{"Fixed", kvm.RFLAGSFixed, 1}, {"IF", kvm.RFLAGSIF, 9},
		},
	} {
		var seen uint64
		for _, b := range bits {
			if b.value != 1<<b.pos {
				t.Errorf("%s%s = %#x, want bit %d (%#x)", reg, b.name, b.value, b.pos, uint64(1)<<b.pos)
			}
			if seen&b.value != 0 {
				t.Errorf("%s%s shares a bit with another %s constant", reg, b.name, reg)
			}
			seen |= b.value
		}
	}
}
