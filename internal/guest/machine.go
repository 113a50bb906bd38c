//go:build amd64

package guest

import (
	"errors"
	"fmt"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/kvm"
)

// Layout of the system slot, relative to Config.SysBase: page tables (a
// PML4, a PDPT, and one page directory per mapped GiB, at most 65), a GDT,
// a TSS, code, and a 64 KiB stack at the top. It is a slot of its own,
// never dirty-logged, so the accessed and dirty bits the guest CPU sets in
// its page tables never show in a guest-RAM dirty log.
const (
	// SysSize is the size of the system slot.
	SysSize    = 2 << 20
	offPML4    = 0x0000
	offPDPT    = 0x1000
	offPD      = 0x2000 // to 0x43000
	offGDT     = 0x50000
	offTSS     = 0x51000
	offCode    = 0x60000 // to SysSize-0x10000
	maxMapGiB  = 64
	defaultSys = 0xFFC0_0000 // in the 32-bit PCI hole of an x86 layout
)

// Config places the system slot.
type Config struct {
	// SysBase is the guest-physical address of the 2 MiB system slot: a
	// multiple of 2 MiB below 512 GiB, and not 0, which means the default,
	// 0xFFC00000 (the top of the 3–4 GiB hole of guestmem.X86Layout).
	SysBase uint64
	// MapGiB is how much guest-physical space, from 0, is identity-mapped
	// with 2 MiB pages (default and maximum 64 GiB). The GiB holding the
	// system slot is always mapped too. A guest access outside the map is
	// a page fault, and with no IDT the vCPU shuts down (ErrUnexpectedExit).
	MapGiB int
}

// Machine is one vCPU in 64-bit long mode with identity-mapped page tables,
// running programs loaded into its system slot.
type Machine struct {
	VM   *kvm.VM   // the VM the Machine was made on; it stays open after Close
	CPU  *kvm.VCPU // vCPU 0, in long mode
	sys  *arena.Mapping
	slot uint32
	base uint64
	code int // next free code offset
}

// New sets up a Machine on vm: it maps and registers the system slot in a
// free slot, creates vCPU 0 and puts it in long mode.
func New(vm *kvm.VM, cfg Config) (*Machine, error) {
	if cfg.SysBase == 0 {
		cfg.SysBase = defaultSys
	}
	if cfg.SysBase%SysSize != 0 || cfg.SysBase >= 512<<30 {
		return nil, fmt.Errorf("guest: system slot at %#x: must be a multiple of 2 MiB below 512 GiB", cfg.SysBase)
	}
	if cfg.MapGiB <= 0 {
		cfg.MapGiB = maxMapGiB
	}
	if cfg.MapGiB > maxMapGiB {
		return nil, fmt.Errorf("guest: MapGiB %d: at most %d GiB can be identity-mapped", cfg.MapGiB, maxMapGiB)
	}
	sys, err := arena.NewAnon(SysSize)
	if err != nil {
		return nil, err
	}
	m := &Machine{VM: vm, sys: sys, base: cfg.SysBase, code: offCode}
	if err := m.writeTables(cfg.MapGiB); err != nil {
		return nil, errors.Join(err, sys.Close())
	}
	if m.slot, err = vm.FreeSlot(); err != nil {
		return nil, errors.Join(err, sys.Close())
	}
	if err := vm.SetSlot(kvm.Slot{ID: m.slot, GPA: m.base, Size: SysSize, HostAddr: sys.Addr()}); err != nil {
		return nil, errors.Join(err, sys.Close())
	}
	if m.CPU, err = vm.CreateVCPU(0); err != nil {
		return nil, errors.Join(err, m.Close())
	}
	if err := m.longMode(); err != nil {
		return nil, errors.Join(err, m.Close())
	}
	return m, nil
}

// Slot returns the system slot's number.
func (m *Machine) Slot() uint32 { return m.slot }

// Close deletes the system slot, then unmaps it, and closes the vCPU. The VM
// stays open.
func (m *Machine) Close() error {
	var errs []error
	if m.CPU != nil {
		errs = append(errs, m.CPU.Close())
	}
	if err := m.VM.DeleteSlot(m.slot); err != nil && !errors.Is(err, kvm.ErrNoSlot) && !errors.Is(err, kvm.ErrClosed) {
		errs = append(errs, err)
	}
	errs = append(errs, m.sys.Close())
	return errors.Join(errs...)
}

func (m *Machine) put64(off int64, v uint64) error {
	return m.sys.WriteUint64(off, v)
}

func (m *Machine) writeTables(gib int) error {
	const present, rw, ps = 1, 2, 0x80
	if err := m.put64(offPML4, m.base+offPDPT|present|rw); err != nil {
		return err
	}
	gibs := make([]int, 0, gib+1)
	for g := 0; g < gib; g++ {
		gibs = append(gibs, g)
	}
	if g := int(m.base >> 30); g >= gib {
		gibs = append(gibs, g) // the system slot's own GiB
	}
	for i, g := range gibs {
		pd := int64(offPD + i*0x1000)
		if err := m.put64(offPDPT+int64(g)*8, m.base+uint64(pd)|present|rw); err != nil {
			return err
		}
		for i := 0; i < 512; i++ {
			addr := uint64(g)<<30 | uint64(i)<<21
			if err := m.put64(pd+int64(i)*8, addr|present|rw|ps); err != nil {
				return err
			}
		}
	}
	// GDT: null, 64-bit code (selector 8), data (selector 16), and a
	// 16-byte busy 64-bit TSS descriptor (selector 24) for the zeroed TSS
	// at offTSS. Only the registers' hidden parts, set in longMode, matter
	// to the CPU; the GDT says the same for anyone who reads it.
	tss := m.base + offTSS
	tssLo := uint64(tssLimit) | (tss&0xffffff)<<16 | 0xb<<40 | 1<<47 | (tss>>24&0xff)<<56
	for i, d := range []uint64{0, 0x00af9a000000ffff, 0x00cf92000000ffff, tssLo, tss >> 32} {
		if err := m.put64(offGDT+int64(i)*8, d); err != nil {
			return err
		}
	}
	return nil
}

const (
	gdtLimit = 5*8 - 1
	tssLimit = 0x67 // a 104-byte 64-bit TSS
)

func (m *Machine) longMode() error {
	if err := m.CPU.SetHostCPUID(); err != nil {
		return err
	}
	s, err := m.CPU.Sregs()
	if err != nil {
		return err
	}
	return m.CPU.SetSregs(longModeSregs(s, m.base))
}

// Segment types (Segment.Typ): with S set, code or data; with S clear, a
// system segment.
const (
	typeCode    = 11 // execute/read, accessed
	typeData    = 3  // read/write, accessed
	typeBusyTSS = 11 // a busy 64-bit TSS (S clear)
)

// Long mode's control registers. CR0: protection and paging (PE, PG), the
// x87 settings of a modern OS (MP, NE, ET), supervisor writes honouring
// read-only pages (WP), alignment checks allowed (AM). CR4: only PAE, which
// long mode needs (no OSFXSR, so SSE instructions fault). EFER: long mode
// enabled and active; KVM_SET_SREGS wants both.
const (
	longModeCR0  = kvm.CR0PG | kvm.CR0AM | kvm.CR0WP | kvm.CR0NE | kvm.CR0ET | kvm.CR0MP | kvm.CR0PE
	longModeCR4  = kvm.CR4PAE
	longModeEFER = kvm.EFERLME | kvm.EFERLMA
)

// longModeSregs returns s changed to 64-bit mode, with the system slot at
// base: flat segments, the TSS, the GDT, the page tables, and the control
// registers and EFER of long mode.
func longModeSregs(s kvm.Sregs, base uint64) kvm.Sregs {
	code := kvm.Segment{Base: 0, Limit: 0xffffffff, Selector: 8, Typ: typeCode, Present: 1, S: 1, L: 1, G: 1}
	data := kvm.Segment{Base: 0, Limit: 0xffffffff, Selector: 16, Typ: typeData, Present: 1, S: 1, DB: 1, G: 1}
	s.CS = code
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	// Hardware virtualization checks TR on entry even though nothing here
	// switches tasks: a present, busy 64-bit TSS. No LDT.
	s.TR = kvm.Segment{Base: base + offTSS, Limit: tssLimit, Selector: 24, Typ: typeBusyTSS, Present: 1}
	s.LDT = kvm.Segment{Unusable: 1}
	s.GDT = kvm.Descriptor{Base: base + offGDT, Limit: gdtLimit}
	s.IDT = kvm.Descriptor{} // none: any exception shuts the vCPU down (ExitShutdown)
	s.CR3 = base + offPML4
	s.CR4 = longModeCR4
	s.CR0 = longModeCR0
	s.EFER = longModeEFER
	return s
}

// Load copies code into the system slot and returns its guest address.
func (m *Machine) Load(code []byte) (uint64, error) {
	if m.code+len(code) > SysSize-0x10000 {
		return 0, fmt.Errorf("guest: code area full")
	}
	if _, err := m.sys.WriteAt(code, int64(m.code)); err != nil {
		return 0, err
	}
	at := m.base + uint64(m.code)
	m.code = (m.code + len(code) + 63) &^ 63
	return at, nil
}

// LoadAsm assembles a and loads it.
func (m *Machine) LoadAsm(a *Asm) (uint64, error) {
	b, err := a.Bytes()
	if err != nil {
		return 0, err
	}
	return m.Load(b)
}

// Handlers answer exits a program causes. A nil handler makes that exit an
// error.
type Handlers struct {
	IO   func(*kvm.IOExit) error   // port I/O; needed for IN
	MMIO func(*kvm.MMIOExit) error // MMIO; reads return zero without it
}

// Result is what a Call observed.
type Result struct {
	Regs  kvm.Regs       // registers at HLT
	Outs  []Out          // port writes, in order
	MMIO  []kvm.MMIOExit // MMIO exits, in order (Data copied)
	Exits int            // KVM_RUN returns
}

// Out is one port write.
type Out struct {
	Port  uint16 // the port
	Value uint32 // the value written (the access's size, zero-extended)
}

// Port returns the last value written to port and whether there was one.
func (r *Result) Port(port uint16) (uint32, bool) {
	for i := len(r.Outs) - 1; i >= 0; i-- {
		if r.Outs[i].Port == port {
			return r.Outs[i].Value, true
		}
	}
	return 0, false
}

// Port64 combines the last values written to lo and hi.
func (r *Result) Port64(lo, hi uint16) (uint64, bool) {
	l, ok1 := r.Port(lo)
	h, ok2 := r.Port(hi)
	return uint64(h)<<32 | uint64(l), ok1 && ok2
}

// ErrUnexpectedExit is returned for an exit no handler takes, a shutdown, or
// an internal error (an instruction the emulator lacks).
var ErrUnexpectedExit = errors.New("guest: unexpected exit")

// Call runs the program at entry with regs (RIP, RSP and RFLAGS are set
// here) until it halts, and returns the registers at the HLT. Port writes
// are recorded in order and passed to h.IO if set; a port read needs h.IO,
// which writes the value into the exit's Data (zeroed first). MMIO
// accesses are recorded, and passed to h.MMIO if set; reads return zero
// unless h.MMIO writes Data. A handler's error ends the Call with it, as do
// a Run error (a *kvm.MemoryFaultError for inaccessible slot memory) and
// any other exit (ErrUnexpectedExit: a shutdown from a fault, an internal
// error from an instruction the emulator lacks). Call has no time limit:
// a program that never halts keeps it running.
//
// A Call that ended on an exit the guest still waits on leaves it pending;
// the next Call completes it (kvm.VCPU.Complete) before setting registers.
func (m *Machine) Call(entry uint64, regs kvm.Regs, h Handlers) (Result, error) {
	if err := m.Start(entry, regs); err != nil {
		return Result{}, err
	}
	var res Result
	for {
		e, err := m.CPU.Run()
		res.Exits++
		if err != nil {
			return res, err
		}
		switch e.Reason {
		case kvm.ExitHLT:
			res.Regs, err = m.CPU.Regs()
			return res, err
		case kvm.ExitIO:
			if e.IO.Out {
				res.Outs = append(res.Outs, Out{Port: e.IO.Port, Value: e.IO.Value()})
			} else {
				clear(e.IO.Data) // the run page holds stale bytes
			}
			if h.IO != nil {
				if err := h.IO(e.IO); err != nil {
					return res, err
				}
			} else if !e.IO.Out {
				return res, fmt.Errorf("%w: %v", ErrUnexpectedExit, e)
			}
		case kvm.ExitMMIO:
			if !e.MMIO.Write {
				clear(e.MMIO.Data) // the run page holds stale bytes
			}
			if h.MMIO != nil {
				if err := h.MMIO(e.MMIO); err != nil {
					return res, err
				}
			}
			c := *e.MMIO
			c.Data = append([]byte(nil), e.MMIO.Data...)
			res.MMIO = append(res.MMIO, c)
		default:
			regs, _ := m.CPU.Regs()
			return res, fmt.Errorf("%w: %v at rip %#x", ErrUnexpectedExit, e, regs.RIP)
		}
	}
}

// Start readies the program at entry with regs (RIP, RSP and RFLAGS set
// here), as Call does, without running it: the caller runs m.CPU itself
// (to kick, pause or cancel it).
func (m *Machine) Start(entry uint64, regs kvm.Regs) error {
	// A previous Call may have returned on an exit the guest still waits
	// on; KVM would apply it, and overwrite the registers, on the next run.
	if err := m.CPU.Complete(); err != nil {
		return err
	}
	regs.RIP = entry
	regs.RSP = m.base + SysSize - 16
	regs.RFLAGS = kvm.RFLAGSFixed // interrupts off
	return m.CPU.SetRegs(regs)
}

// Spin counts RCX down to zero in a loop of two instructions, then halts:
// a guest that runs for as long as the caller likes, touching no memory.
func Spin() *Asm {
	a := &Asm{}
	a.Label("loop")
	a.Dec(RCX)
	a.Jnz("loop")
	a.Hlt()
	return a
}

// Count adds one to the quadword at RBX, RCX times, then halts: a guest
// that keeps writing guest memory.
func Count() *Asm {
	a := &Asm{}
	a.Label("loop")
	a.Load(RAX, RBX)
	a.AddImm(RAX, 1)
	a.Store(RBX, RAX)
	a.Dec(RCX)
	a.Jnz("loop")
	a.Hlt()
	return a
}

// Ports the standard programs report on.
const (
	PortLo   = 0x10 // low 32 bits of a result
	PortHi   = 0x11 // high 32 bits
	PortFail = 0x12 // a verification failed; PortLo/PortHi hold the address
	PortDone = 0x13 // a program finished
)

func reportRAX(a *Asm) {
	a.Out(PortLo)
	a.Shr(RAX, 32)
	a.Out(PortHi)
}

// FillPages writes (address XOR RDX) into the first quadword of every
// stride (RBX) bytes from RSI up to RDI.
func FillPages() *Asm {
	a := &Asm{}
	a.Label("loop")
	a.Mov(RAX, RSI)
	a.Xor(RAX, RDX)
	a.Store(RSI, RAX)
	a.Add(RSI, RBX)
	a.Cmp(RSI, RDI)
	a.Jb("loop")
	a.Out(PortDone)
	a.Hlt()
	return a
}

// SumPages adds the first quadword of every stride (RBX) bytes from RSI up
// to RDI and reports the sum on PortLo and PortHi.
func SumPages() *Asm {
	a := &Asm{}
	a.Xor(RAX, RAX)
	a.Label("loop")
	a.AddMem(RAX, RSI)
	a.Add(RSI, RBX)
	a.Cmp(RSI, RDI)
	a.Jb("loop")
	reportRAX(a)
	a.Out(PortDone)
	a.Hlt()
	return a
}

// VerifyPages checks that the first quadword of every stride (RBX) bytes
// from RSI up to RDI is (address XOR RDX). On the first mismatch it reports
// the address on PortLo/PortHi and writes PortFail; otherwise PortDone.
func VerifyPages() *Asm {
	a := &Asm{}
	a.Label("loop")
	a.Mov(RAX, RSI)
	a.Xor(RAX, RDX)
	a.CmpMem(RAX, RSI)
	a.Jnz("fail")
	a.Add(RSI, RBX)
	a.Cmp(RSI, RDI)
	a.Jb("loop")
	a.Out(PortDone)
	a.Hlt()
	a.Label("fail")
	a.Mov(RAX, RSI)
	reportRAX(a)
	a.Out(PortFail)
	a.Hlt()
	return a
}

// Poll reads the quadword at RSI until it equals RDX, then writes PortDone.
// Each read of an address no slot backs is an MMIO exit.
func Poll() *Asm {
	a := &Asm{}
	a.Label("loop")
	a.Load(RAX, RSI)
	a.Cmp(RAX, RDX)
	a.Jnz("loop")
	a.Out(PortDone)
	a.Hlt()
	return a
}

// Store writes RDX to the quadword at RSI.
func Store() *Asm {
	a := &Asm{}
	a.Store(RSI, RDX)
	a.Out(PortDone)
	a.Hlt()
	return a
}

// Load reads the quadword at RSI and reports it on PortLo and PortHi.
func Load() *Asm {
	a := &Asm{}
	a.Load(RAX, RSI)
	reportRAX(a)
	a.Out(PortDone)
	a.Hlt()
	return a
}

// Pattern is the value FillPages writes at address addr with seed.
func Pattern(addr, seed uint64) uint64 { return addr ^ seed }
