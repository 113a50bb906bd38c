//go:build amd64

package kvm

import (
	"testing"
	"unsafe"
)

// TestRegsLayout checks the size of Regs, Sregs, Segment and Descriptor, and
// the offset of every field, against struct kvm_regs, kvm_sregs,
// kvm_segment and kvm_dtable in arch/x86/include/uapi/asm/kvm.h, as a C
// compiler lays them out (offsetof, sizeof on x86-64). The register ioctls
// pass these structures to the kernel as they are, so a field out of place
// would set the wrong register.
func TestRegsLayout(t *testing.T) {
	var (
		r  Regs
		s  Sregs
		sg Segment
		d  Descriptor
	)
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		// Safety: Sizeof and Offsetof only measure types; nothing is accessed.
		{"sizeof(kvm_regs)", unsafe.Sizeof(r), 144},
		{"kvm_regs.rax", unsafe.Offsetof(r.RAX), 0},
		{"kvm_regs.rbx", unsafe.Offsetof(r.RBX), 8},
		{"kvm_regs.rcx", unsafe.Offsetof(r.RCX), 16},
		{"kvm_regs.rdx", unsafe.Offsetof(r.RDX), 24},
		// Safety: as above, measuring only.
		{"kvm_regs.rsi", unsafe.Offsetof(r.RSI), 32},
		{"kvm_regs.rdi", unsafe.Offsetof(r.RDI), 40},
		{"kvm_regs.rsp", unsafe.Offsetof(r.RSP), 48},
		{"kvm_regs.rbp", unsafe.Offsetof(r.RBP), 56},
		{"kvm_regs.r8", unsafe.Offsetof(r.R8), 64},
		// Safety: as above, measuring only.
		{"kvm_regs.r9", unsafe.Offsetof(r.R9), 72},
		{"kvm_regs.r10", unsafe.Offsetof(r.R10), 80},
		{"kvm_regs.r11", unsafe.Offsetof(r.R11), 88},
		{"kvm_regs.r12", unsafe.Offsetof(r.R12), 96},
		{"kvm_regs.r13", unsafe.Offsetof(r.R13), 104},
		// Safety: as above, measuring only.
		{"kvm_regs.r14", unsafe.Offsetof(r.R14), 112},
		{"kvm_regs.r15", unsafe.Offsetof(r.R15), 120},
		{"kvm_regs.rip", unsafe.Offsetof(r.RIP), 128},
		{"kvm_regs.rflags", unsafe.Offsetof(r.RFLAGS), 136},

		// Safety: as above, measuring only.
		{"sizeof(kvm_segment)", unsafe.Sizeof(sg), 24},
		{"kvm_segment.base", unsafe.Offsetof(sg.Base), 0},
		{"kvm_segment.limit", unsafe.Offsetof(sg.Limit), 8},
		{"kvm_segment.selector", unsafe.Offsetof(sg.Selector), 12},
		{"kvm_segment.type", unsafe.Offsetof(sg.Typ), 14},
		// Safety: as above, measuring only.
		{"kvm_segment.present", unsafe.Offsetof(sg.Present), 15},
		{"kvm_segment.dpl", unsafe.Offsetof(sg.DPL), 16},
		{"kvm_segment.db", unsafe.Offsetof(sg.DB), 17},
		{"kvm_segment.s", unsafe.Offsetof(sg.S), 18},
		{"kvm_segment.l", unsafe.Offsetof(sg.L), 19},
		// Safety: as above, measuring only.
		{"kvm_segment.g", unsafe.Offsetof(sg.G), 20},
		{"kvm_segment.avl", unsafe.Offsetof(sg.AVL), 21},
		{"kvm_segment.unusable", unsafe.Offsetof(sg.Unusable), 22},
		// The padding byte is a blank field: it is the one byte between
		// unusable and the end.
		{"kvm_segment.padding", unsafe.Offsetof(sg.Unusable) + unsafe.Sizeof(sg.Unusable), 23},

		// Safety: as above, measuring only.
		{"sizeof(kvm_dtable)", unsafe.Sizeof(d), 16},
		{"kvm_dtable.base", unsafe.Offsetof(d.Base), 0},
		{"kvm_dtable.limit", unsafe.Offsetof(d.Limit), 8},
		{"kvm_dtable.padding", unsafe.Offsetof(d.Limit) + unsafe.Sizeof(d.Limit), 10}, // 3 × u16 to the end

		// Safety: as above, measuring only.
		{"sizeof(kvm_sregs)", unsafe.Sizeof(s), 312},
		{"kvm_sregs.cs", unsafe.Offsetof(s.CS), 0},
		{"kvm_sregs.ds", unsafe.Offsetof(s.DS), 24},
		{"kvm_sregs.es", unsafe.Offsetof(s.ES), 48},
		{"kvm_sregs.fs", unsafe.Offsetof(s.FS), 72},
		// Safety: as above, measuring only.
		{"kvm_sregs.gs", unsafe.Offsetof(s.GS), 96},
		{"kvm_sregs.ss", unsafe.Offsetof(s.SS), 120},
		{"kvm_sregs.tr", unsafe.Offsetof(s.TR), 144},
		{"kvm_sregs.ldt", unsafe.Offsetof(s.LDT), 168},
		{"kvm_sregs.gdt", unsafe.Offsetof(s.GDT), 192},
		// Safety: as above, measuring only.
		{"kvm_sregs.idt", unsafe.Offsetof(s.IDT), 208},
		{"kvm_sregs.cr0", unsafe.Offsetof(s.CR0), 224},
		{"kvm_sregs.cr2", unsafe.Offsetof(s.CR2), 232},
		{"kvm_sregs.cr3", unsafe.Offsetof(s.CR3), 240},
		{"kvm_sregs.cr4", unsafe.Offsetof(s.CR4), 248},
		// Safety: as above, measuring only.
		{"kvm_sregs.cr8", unsafe.Offsetof(s.CR8), 256},
		{"kvm_sregs.efer", unsafe.Offsetof(s.EFER), 264},
		{"kvm_sregs.apic_base", unsafe.Offsetof(s.ApicBase), 272},
		{"kvm_sregs.interrupt_bitmap", unsafe.Offsetof(s.InterruptBitmap), 280},
		{"sizeof(kvm_sregs.interrupt_bitmap)", unsafe.Sizeof(s.InterruptBitmap), 32}, // (KVM_NR_INTERRUPTS+63)/64 words
	} {
		if c.got != c.want {
			t.Errorf("%s: %d, want %d", c.name, c.got, c.want)
		}
	}
}
