package kvm

// The vCPU register state KVM_GET_REGS, KVM_SET_REGS, KVM_GET_SREGS and
// KVM_SET_SREGS pass, as x86-64 KVM defines it
// (arch/x86/include/uapi/asm/kvm.h). The ioctls hand these structures to the
// kernel as they are, so each is laid out exactly as its C counterpart:
// same field order, same sizes, no padding Go would add (TestRegsLayout
// checks every offset, and ioctl_unsafe.go refuses to compile if a size
// drifts).
//
// These are x86-64's structures, but they are declared for every GOARCH, so
// that code naming them (internal/guest and the programs that use it) builds
// for arm64 too; there the kernel refuses the register ioctls (arm64 KVM
// reads and writes registers one at a time, with KVM_GET_ONE_REG).

// Regs are a vCPU's general-purpose registers, the instruction pointer and
// the flags (struct kvm_regs, 144 bytes).
type Regs struct {
	RAX    uint64 // rax
	RBX    uint64 // rbx
	RCX    uint64 // rcx
	RDX    uint64 // rdx
	RSI    uint64 // rsi
	RDI    uint64 // rdi
	RSP    uint64 // rsp, the stack pointer
	RBP    uint64 // rbp
	R8     uint64 // r8
	R9     uint64 // r9
	R10    uint64 // r10
	R11    uint64 // r11
	R12    uint64 // r12
	R13    uint64 // r13
	R14    uint64 // r14
	R15    uint64 // r15
	RIP    uint64 // rip, the address of the next instruction
	RFLAGS uint64 // rflags; bit 1 (RFLAGSFixed) must be set
}

// Sregs are a vCPU's special registers: the segment registers, the
// descriptor-table registers, the control registers, EFER and the APIC
// base (struct kvm_sregs, 312 bytes).
type Sregs struct {
	CS  Segment    // code segment
	DS  Segment    // data segment
	ES  Segment    // extra data segment
	FS  Segment    // FS; in 64-bit mode only its base is used
	GS  Segment    // GS; in 64-bit mode only its base is used
	SS  Segment    // stack segment
	TR  Segment    // task register: the TSS, which hardware virtualization checks on entry
	LDT Segment    // local descriptor table register; Unusable when there is none
	GDT Descriptor // global descriptor table register (GDTR)
	IDT Descriptor // interrupt descriptor table register (IDTR)
	CR0 uint64     // CR0: protection, paging and FPU control (CR0PE, CR0PG, ...)
	CR2 uint64     // CR2: the address of the last page fault
	CR3 uint64     // CR3: the guest-physical address of the top-level page table
	CR4 uint64     // CR4: architecture extensions (CR4PAE, CR4OSFXSR, ...)
	CR8 uint64     // CR8: the task priority register
	// EFER is the extended feature enable register, MSR 0xC0000080
	// (EFERLME, EFERLMA, ...).
	EFER uint64
	// ApicBase is the local APIC's base address and flags, MSR
	// IA32_APIC_BASE (0x1B).
	ApicBase uint64
	// InterruptBitmap has one bit per interrupt vector (256; bit v%64 of
	// word v/64 is vector v): the external interrupt KVM has queued for
	// injection and not yet delivered, so at most one bit is set.
	// KVM_SET_SREGS queues the lowest vector set.
	InterruptBitmap [4]uint64
}

// Segment is a segment register as KVM holds it, the visible selector and
// the hidden part the CPU loaded from the descriptor, unpacked (struct
// kvm_segment, 24 bytes; its last byte, padding, is a blank field). The
// one-bit fields hold 0 or 1.
type Segment struct {
	Base     uint64 // base address
	Limit    uint32 // limit in bytes, already scaled by G (0xffffffff for a flat 4 GiB segment)
	Selector uint16 // the visible selector: descriptor index << 3 | TI << 2 | RPL
	// Typ is the descriptor's 4-bit type. With S set: 11 is execute/read
	// code, accessed; 3 is read/write data, accessed. With S clear (a
	// system segment): 11 is a busy 64-bit TSS, 2 an LDT.
	Typ     uint8
	Present uint8 // P: the segment is present
	DPL     uint8 // descriptor privilege level, 0 to 3
	DB      uint8 // D/B: 32-bit default operand size (code) or stack (data); 0 for 64-bit code
	S       uint8 // S: a code or data segment (1) rather than a system segment (0)
	L       uint8 // L: 64-bit code (CS only, in long mode)
	G       uint8 // G: the limit is in 4 KiB units in the descriptor
	AVL     uint8 // AVL: available to software
	// Unusable marks a segment register with no usable segment loaded (a
	// null selector), as VMX's "unusable" attribute does.
	Unusable uint8
	_        uint8 // padding, to the kernel's 24 bytes
}

// Descriptor is a descriptor-table register, GDTR or IDTR (struct
// kvm_dtable, 16 bytes; its padding is a blank field).
type Descriptor struct {
	Base  uint64    // linear address of the table
	Limit uint16    // size of the table in bytes, minus one
	_     [3]uint16 // padding, to the kernel's 16 bytes
}

// Bits of the control registers, EFER and RFLAGS that a VMM sets up. Each
// is named for its register followed by its name in the Intel SDM (and
// Linux's asm/processor-flags.h, where CR0PE is X86_CR0_PE): CR0PE is bit
// PE of CR0. They are untyped, so they combine with the uint64 fields of
// Sregs and Regs directly: s.CR0 = CR0PG | CR0PE.
const (
	CR0PE = 1 << 0  // protection enable: protected mode
	CR0MP = 1 << 1  // monitor coprocessor: WAIT honours TS
	CR0EM = 1 << 2  // emulation: no x87 FPU, its instructions fault
	CR0TS = 1 << 3  // task switched: the next FPU instruction faults
	CR0ET = 1 << 4  // extension type: always 1 on modern CPUs
	CR0NE = 1 << 5  // numeric error: x87 errors as exceptions, not IRQ 13
	CR0WP = 1 << 16 // write protect: supervisor writes honour read-only pages
	CR0AM = 1 << 18 // alignment mask: allows alignment checking (with RFLAGS.AC)
	CR0NW = 1 << 29 // not write-through
	CR0CD = 1 << 30 // cache disable
	CR0PG = 1 << 31 // paging
)

// CR4 bits.
const (
	CR4VME        = 1 << 0  // virtual-8086 mode extensions
	CR4PVI        = 1 << 1  // protected-mode virtual interrupts
	CR4TSD        = 1 << 2  // time stamp disable: RDTSC only at CPL 0
	CR4DE         = 1 << 3  // debugging extensions
	CR4PSE        = 1 << 4  // page size extensions: 4 MiB pages in 32-bit paging
	CR4PAE        = 1 << 5  // physical address extension: required for long mode
	CR4MCE        = 1 << 6  // machine-check enable
	CR4PGE        = 1 << 7  // page global enable
	CR4PCE        = 1 << 8  // performance-monitoring counter enable: RDPMC at any CPL
	CR4OSFXSR     = 1 << 9  // OS supports FXSAVE/FXRSTOR: enables SSE
	CR4OSXMMEXCPT = 1 << 10 // OS handles unmasked SIMD floating-point exceptions (#XM)
	CR4UMIP       = 1 << 11 // user-mode instruction prevention
	CR4LA57       = 1 << 12 // 57-bit linear addresses: five-level paging
	CR4VMXE       = 1 << 13 // VMX enable
	CR4FSGSBASE   = 1 << 16 // RDFSBASE, WRFSBASE, RDGSBASE, WRGSBASE
	CR4PCIDE      = 1 << 17 // process-context identifiers
	CR4OSXSAVE    = 1 << 18 // OS supports XSAVE and XGETBV/XSETBV
	CR4SMEP       = 1 << 20 // supervisor-mode execution prevention
	CR4SMAP       = 1 << 21 // supervisor-mode access prevention
	CR4PKE        = 1 << 22 // protection keys for user pages
)

// EFER bits.
const (
	EFERSCE = 1 << 0  // system call extensions: SYSCALL and SYSRET
	EFERLME = 1 << 8  // long mode enable
	EFERLMA = 1 << 10 // long mode active; KVM_SET_SREGS wants it set exactly when LME and CR0PG are
	EFERNXE = 1 << 11 // no-execute enable: the XD bit of page-table entries
)

// RFLAGS bits. RFLAGSFixed has no name in the SDM, where it is "reserved,
// always 1" (Linux: X86_EFLAGS_FIXED).
const (
	RFLAGSFixed = 1 << 1 // always 1: the minimal valid RFLAGS
	RFLAGSIF    = 1 << 9 // interrupt enable
)
