//go:build amd64

package boot

import (
	"encoding/binary"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/kvm"
)

// A GDT descriptor, as its fields are packed into 8 bytes (Intel SDM vol. 3,
// 3.4.5). access is the byte holding P, DPL, S and the type; flags the
// nibble holding G, D/B, L and AVL.
type descriptor struct {
	base, limit   uint32 // limit in units of G (20 bits)
	access, flags uint8
}

func (d descriptor) pack() uint64 {
	return uint64(d.limit&0xffff) | uint64(d.base&0xffffff)<<16 | uint64(d.access)<<40 |
		uint64(d.limit>>16&0xf)<<48 | uint64(d.flags&0xf)<<52 | uint64(d.base>>24)<<56
}

// segment is the register KVM loads for the descriptor at selector: the
// hidden part the CPU would load from the GDT, so the registers and the
// table in memory say the same.
func (d descriptor) segment(selector uint16) kvm.Segment {
	limit := d.limit & 0xfffff
	g := d.flags >> 3 & 1
	if g == 1 {
		limit = limit<<12 | 0xfff
	}
	return kvm.Segment{
		Base: uint64(d.base), Limit: limit, Selector: selector,
		Typ: d.access & 0xf, S: d.access >> 4 & 1, DPL: d.access >> 5 & 3, Present: d.access >> 7,
		AVL: d.flags & 1, L: d.flags >> 1 & 1, DB: d.flags >> 2 & 1, G: g,
	}
}

// Descriptors of the boot GDTs: flat 4 GiB code and data, and a TSS of 0x68
// bytes at 0 (nothing switches tasks, but entry checks TR on hardware
// virtualization, and PVH asks for exactly this one).
var (
	code64 = descriptor{limit: 0xfffff, access: 0x9b, flags: 0xa} // P, S, execute/read accessed; G, L
	code32 = descriptor{limit: 0xfffff, access: 0x9b, flags: 0xc} // P, S, execute/read accessed; G, D
	data   = descriptor{limit: 0xfffff, access: 0x93, flags: 0xc} // P, S, read/write accessed; G, B
	tss    = descriptor{limit: 0x67, access: 0x8b}                // P, busy TSS (64-bit in long mode, 32-bit otherwise)
)

// gdtTable is a GDT with the selectors of its code, data and TSS entries.
type gdtTable struct {
	entries        []uint64
	cs, ds, trSel  uint16
	code, dat, trD descriptor
}

// The 64-bit protocol wants __BOOT_CS at 0x10 and __BOOT_DS at 0x18
// (boot.rst, "64-bit Boot Protocol"); the TSS descriptor is 16 bytes in long
// mode. PVH leaves selectors unspecified: Firecracker's layout.
var (
	gdt64 = gdtTable{
		entries: []uint64{0, 0, code64.pack(), data.pack(), tss.pack(), 0},
		cs:      0x10, ds: 0x18, trSel: 0x20, code: code64, dat: data, trD: tss,
	}
	gdtPVH = gdtTable{
		entries: []uint64{0, code32.pack(), data.pack(), tss.pack()},
		cs:      0x8, ds: 0x10, trSel: 0x18, code: code32, dat: data, trD: tss,
	}
)

func gdtBytes(g gdtTable) []byte {
	b := make([]byte, 0, 8*len(g.entries))
	for _, e := range g.entries {
		b = binary.LittleEndian.AppendUint64(b, e)
	}
	return b
}

// sregsFor sets the segments and descriptor tables of g: CS its code
// segment, DS, ES, FS, GS and SS its data segment, TR its TSS, no LDT, and
// no IDT (the kernel loads its own before enabling interrupts; an exception
// before then shuts the vCPU down either way).
func sregsFor(g gdtTable) kvm.Sregs {
	var s kvm.Sregs
	s.CS = g.code.segment(g.cs)
	d := g.dat.segment(g.ds)
	s.DS, s.ES, s.FS, s.GS, s.SS = d, d, d, d, d
	s.TR = g.trD.segment(g.trSel)
	s.LDT = kvm.Segment{Unusable: 1}
	s.GDT = kvm.Descriptor{Base: uint64(GDTAddr), Limit: uint16(8*len(g.entries) - 1)}
	return s
}

// long64Sregs is the 64-bit protocol's state: long mode with paging on the
// identity map at PML4Addr. CR0: protection, paging, and ET (hardwired to 1
// on every CPU since the 486). CR4: PAE, which long mode needs, only.
func long64Sregs() kvm.Sregs {
	s := sregsFor(gdt64)
	s.CR0 = kvm.CR0PE | kvm.CR0ET | kvm.CR0PG
	s.CR3 = uint64(PML4Addr)
	s.CR4 = kvm.CR4PAE
	s.EFER = kvm.EFERLME | kvm.EFERLMA
	return s
}

// pvhSregs is the PVH ABI's state: 32-bit protected mode, paging off, CR0
// PE (and the read-only ET) set and every other writable bit clear, CR4 and
// EFER clear.
func pvhSregs() kvm.Sregs {
	s := sregsFor(gdtPVH)
	s.CR0 = kvm.CR0PE | kvm.CR0ET
	return s
}

// kvm64Regs starts the 64-bit protocol at entry: RSI at boot_params, a
// stack, interrupts off.
func kvm64Regs(entry guestmem.GuestAddress) kvm.Regs {
	return kvm.Regs{RIP: uint64(entry), RSI: uint64(ZeroPageAddr), RSP: uint64(StackTop), RBP: uint64(StackTop),
		RFLAGS: kvm.RFLAGSFixed}
}

// pvhRegs starts PVH at entry: EBX at hvm_start_info, interrupts off.
func pvhRegs(entry uint32) kvm.Regs {
	return kvm.Regs{RIP: uint64(entry), RBX: uint64(StartInfoAddr), RFLAGS: kvm.RFLAGSFixed}
}

// identityMapGiB returns how many GiB from 0 the 64-bit page tables map:
// max(4, the top of usable RAM rounded up to a GiB), at most
// MaxIdentityMapGiB.
func identityMapGiB(mm memMap) int {
	var top uint64
	for _, e := range mm {
		if e.Type == E820RAM {
			top = max(top, uint64(e.End()))
		}
	}
	gib := int((top + 1<<30 - 1) >> 30)
	return min(max(gib, 4), MaxIdentityMapGiB)
}

// pageTables returns the PML4, the PDPT and gib page directories,
// contiguous from PML4Addr, identity-mapping [0, gib GiB) with 2 MiB pages
// (present, writable; PS in the directories).
func pageTables(gib int) []byte {
	const present, writable, huge = 1, 2, 0x80
	const page = 4096
	b := make([]byte, (2+gib)*page)
	le := binary.LittleEndian
	le.PutUint64(b[0:], uint64(PDPTAddr)|present|writable)
	for g := range gib {
		pd := uint64(PDAddr) + uint64(g)*page
		le.PutUint64(b[page+8*g:], pd|present|writable)
		for i := range 512 {
			addr := uint64(g)<<30 | uint64(i)<<21
			le.PutUint64(b[(2+g)*page+8*i:], addr|present|writable|huge)
		}
	}
	return b
}
