//go:build amd64

package guest

import (
	"testing"

	"github.com/gmem-vmm/gmem/kvm"
)

// TestLongModeSregs checks, without KVM, the special registers New gives
// the vCPU: the control registers and EFER are the values the harness has
// always set (CR0 0x80050033, CR4 0x20, EFER 0x500), now spelled with the
// kvm package's bit names, the segments are 64-bit code and flat data,
// and what the setup does not own (the APIC base, CR8, a pending
// interrupt) is kept as KVM reported it.
func TestLongModeSregs(t *testing.T) {
	const base = 0xFFC0_0000
	in := kvm.Sregs{CR8: 5, ApicBase: 0xfee00900, InterruptBitmap: [4]uint64{1 << 32}, CR2: 0x1234}
	s := longModeSregs(in, base)
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"CR0", s.CR0, 0x80050033}, {"CR4", s.CR4, 0x20}, {"EFER", s.EFER, 0x500}, {"CR3", s.CR3, base + offPML4},
		{"CR2", s.CR2, 0x1234}, {"CR8", s.CR8, 5}, {"ApicBase", s.ApicBase, 0xfee00900},
		{"InterruptBitmap[0]", s.InterruptBitmap[0], 1 << 32},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
	code := kvm.Segment{Limit: 0xffffffff, Selector: 8, Typ: 11, Present: 1, S: 1, L: 1, G: 1}
	data := kvm.Segment{Limit: 0xffffffff, Selector: 16, Typ: 3, Present: 1, S: 1, DB: 1, G: 1}
	if s.CS != code {
		t.Errorf("CS = %+v, want %+v", s.CS, code)
	}
	for name, seg := range map[string]kvm.Segment{"DS": s.DS, "ES": s.ES, "FS": s.FS, "GS": s.GS, "SS": s.SS} {
		if seg != data {
			t.Errorf("%s = %+v, want %+v", name, seg, data)
		}
	}
	if tr := (kvm.Segment{Base: base + offTSS, Limit: 0x67, Selector: 24, Typ: 11, Present: 1}); s.TR != tr {
		t.Errorf("TR = %+v, want %+v", s.TR, tr)
	}
	if s.LDT != (kvm.Segment{Unusable: 1}) {
		t.Errorf("LDT = %+v, want unusable", s.LDT)
	}
	if gdt := (kvm.Descriptor{Base: base + offGDT, Limit: 5*8 - 1}); s.GDT != gdt || s.IDT != (kvm.Descriptor{}) {
		t.Errorf("GDT %+v IDT %+v, want %+v and none", s.GDT, s.IDT, gdt)
	}
}
