//go:build amd64

package guest

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

const mib = 1 << 20

// newMachine makes a VM and a Machine with cfg, and a RAM slot of size
// bytes at gpa; all closed at cleanup.
func newMachine(t *testing.T, cfg Config, gpa, size uint64) (*Machine, *arena.Mapping) {
	t.Helper()
	vm := testenv.VM(t)
	m, err := New(vm, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Error(err)
		}
	})
	ram, err := arena.NewAnon(int64(size))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ram.Close() })
	id, err := vm.FreeSlot()
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.SetSlot(kvm.Slot{ID: id, GPA: gpa, Size: size, HostAddr: ram.Addr()}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.DeleteSlot(id) })
	return m, ram
}

func call(t *testing.T, m *Machine, a *Asm, regs kvm.Regs, h Handlers) Result {
	t.Helper()
	entry, err := m.LoadAsm(a)
	if err != nil {
		t.Fatal(err)
	}
	res, err := m.Call(entry, regs, h)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// TestEveryInstructionRuns runs each instruction the assembler emits, with
// the high registers and the memory forms that need a SIB byte or a
// displacement, and checks the results: all of them must work in KVM's
// instruction emulator, which ends KVM_RUN on anything it lacks.
func TestEveryInstructionRuns(t *testing.T) {
	const ram = 1 << 30
	m, mem := newMachine(t, Config{}, ram, 2*mib)
	a := &Asm{}
	a.MovImm(R12, ram)
	a.MovImm(R13, ram+8)
	a.MovImm(RAX, 0x1111)
	a.Store(R12, RAX) // [ram] = 0x1111
	a.MovImm(RDX, 0x2222)
	a.Store(R13, RDX) // [ram+8] = 0x2222
	a.Load(R10, R13)  // r10 = 0x2222
	a.Mov(R15, R10)
	a.AddMem(R15, R12)   // 0x3333
	a.AddImm(R15, 0x100) // 0x3433
	a.Mov(R9, R15)
	a.Xor(R9, RAX) // 0x2522
	a.Shr(R9, 4)   // 0x252
	a.MovImm(RBP, ram)
	a.Load(R11, RBP) // 0x1111
	a.Store(RSP, R9) // onto the stack, in the system slot
	a.Load(RBX, RSP) // 0x252
	a.MovImm(R14, 5)
	a.MovImm(R8, 0)
	a.Label("loop")
	a.AddImm(R8, 2)
	a.Dec(R14)
	a.Jnz("loop") // r8 = 10
	a.CmpMem(R11, R12)
	a.Jz("equal")
	a.Out(PortFail)
	a.Label("equal")
	a.MovImm(RSI, 1)
	a.MovImm(RDI, 2)
	a.Cmp(RSI, RDI)
	a.Jb("below")
	a.Out(PortFail)
	a.Label("below")
	a.Jmp("io")
	a.Out(PortFail)
	a.Label("io")
	a.In(0x20)
	a.Out(PortLo)
	a.Out(PortDone)
	a.Hlt()
	res := call(t, m, a, kvm.Regs{}, Handlers{IO: func(io *kvm.IOExit) error {
		if !io.Out {
			if io.Port != 0x20 || io.Size != 4 {
				return fmt.Errorf("unexpected IN %+v", *io)
			}
			copy(io.Data, []byte{0xcd, 0xab, 0, 0})
		}
		return nil
	}})
	if _, failed := res.Port(PortFail); failed {
		t.Fatalf("a comparison went the wrong way: %+v", res.Outs)
	}
	r := res.Regs
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"r10", r.R10, 0x2222}, {"r15", r.R15, 0x3433}, {"r9", r.R9, 0x252}, {"r11", r.R11, 0x1111},
		{"rbx", r.RBX, 0x252}, {"r14", r.R14, 0}, {"r8", r.R8, 10}, {"rax (in)", r.RAX, 0xabcd},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
	if v, _ := res.Port(PortLo); v != 0xabcd {
		t.Errorf("OUT wrote %#x", v)
	}
	if v, _ := mem.ReadUint64(8); v != 0x2222 {
		t.Errorf("[ram+8] = %#x", v)
	}
}

// TestMachineSetup: the system slot is where Config says, not dirty
// logged, and the vCPU is in 64-bit mode with a usable TR; Close removes
// the slot (before unmapping it) and may be called again.
func TestMachineSetup(t *testing.T) {
	vm := testenv.VM(t)
	const base = 0x8000_0000
	m, err := New(vm, Config{SysBase: base, MapGiB: 4})
	if err != nil {
		t.Fatal(err)
	}
	s, err := vm.Slot(m.Slot())
	if err != nil {
		t.Fatal(err)
	}
	if s.GPA != base || s.Size != SysSize || s.Flags != 0 {
		t.Fatalf("system slot %+v", s)
	}
	sr, err := m.CPU.Sregs()
	if err != nil {
		t.Fatal(err)
	}
	if sr.EFER&kvm.EFERLMA == 0 || sr.CS.L != 1 || sr.CR3 != base+offPML4 || sr.TR.Typ != typeBusyTSS ||
		sr.TR.Present != 1 {
		t.Fatalf("vCPU state: EFER %#x CS %+v CR3 %#x TR %+v", sr.EFER, sr.CS, sr.CR3, sr.TR)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if len(vm.Slots()) != 0 {
		t.Fatalf("slots after Close: %+v", vm.Slots())
	}
	if _, mapped := testenv.VMAAt(t, m.sys.Addr()); mapped {
		t.Fatal("the system slot's memory is still mapped")
	}
	if err := m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	for _, cfg := range []Config{{SysBase: base + 4096}, {SysBase: 512 << 30}, {MapGiB: maxMapGiB + 1}} {
		if m, err := New(vm, cfg); err == nil {
			m.Close()
			t.Errorf("New(%+v) accepted a bad config", cfg)
		}
	}
	if len(vm.Slots()) != 0 {
		t.Fatalf("a refused New left slots: %+v", vm.Slots())
	}
}

// TestMapGiB: an access beyond the identity map faults; with no IDT the
// vCPU shuts down, which Call reports as ErrUnexpectedExit.
func TestMapGiB(t *testing.T) {
	m, _ := newMachine(t, Config{MapGiB: 1}, 0, 2*mib)
	load, err := m.LoadAsm(Load())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Call(load, kvm.Regs{RSI: 1<<30 - 8}, Handlers{}); err != nil {
		t.Fatalf("load inside the map: %v", err)
	}
	_, err = m.Call(load, kvm.Regs{RSI: 1 << 30}, Handlers{})
	if !errors.Is(err, ErrUnexpectedExit) || !strings.Contains(err.Error(), "shutdown") {
		t.Fatalf("load outside the map: %v, want a shutdown", err)
	}
}

// TestCallExits: an IN without a handler is ErrUnexpectedExit; MMIO reads
// are answered by the handler (or with zeros) and recorded; a handler's
// error ends the Call; the next Call runs normally.
func TestCallExits(t *testing.T) {
	m, _ := newMachine(t, Config{}, 0, 2*mib)
	in := &Asm{}
	in.In(0x30)
	in.Hlt()
	entry, err := m.LoadAsm(in)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Call(entry, kvm.Regs{}, Handlers{}); !errors.Is(err, ErrUnexpectedExit) {
		t.Fatalf("IN without a handler: %v", err)
	}

	// Poll an MMIO address until it reads 3: three MMIO reads before.
	reads := 0
	res := call(t, m, Poll(), kvm.Regs{RSI: 0xE000_0000, RDX: 3}, Handlers{MMIO: func(e *kvm.MMIOExit) error {
		reads++
		e.Data[0] = byte(reads)
		return nil
	}})
	if reads != 3 || len(res.MMIO) != 3 || res.MMIO[2].Data[0] != 3 {
		t.Fatalf("%d reads, recorded %+v", reads, res.MMIO)
	}
	if _, ok := res.Port(PortDone); !ok {
		t.Fatal("Poll did not finish")
	}

	// Without a handler MMIO reads are zeros.
	res = call(t, m, Load(), kvm.Regs{RSI: 0xE000_0000}, Handlers{})
	if v, _ := res.Port64(PortLo, PortHi); v != 0 || len(res.MMIO) != 1 {
		t.Fatalf("unanswered MMIO read gave %#x, recorded %+v", v, res.MMIO)
	}

	stop := errors.New("stop")
	_, err = m.Call(entry, kvm.Regs{}, Handlers{IO: func(*kvm.IOExit) error { return stop }})
	if !errors.Is(err, stop) {
		t.Fatalf("handler error: %v", err)
	}
	// The abandoned IN is completed before the next program starts.
	res = call(t, m, Store(), kvm.Regs{RSI: 0x1000, RDX: 9}, Handlers{})
	if _, ok := res.Port(PortDone); !ok || len(res.Outs) != 1 {
		t.Fatalf("the next Call did not run its own program: %+v", res.Outs)
	}
}

func TestCodeAreaFull(t *testing.T) {
	vm := testenv.VM(t)
	m, err := New(vm, Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	big := make([]byte, 256<<10)
	var loadErr error
	for i := 0; i < 16 && loadErr == nil; i++ {
		_, loadErr = m.Load(big)
	}
	if loadErr == nil || !strings.Contains(loadErr.Error(), "full") {
		t.Fatalf("loading 4 MiB of code into a 2 MiB slot: %v", loadErr)
	}
}

// TestFillSumVerify runs the standard programs over a small slot.
func TestFillSumVerify(t *testing.T) {
	const base, size, seed = 0, 16 * mib, 0x5a5a
	m, ram := newMachine(t, Config{}, base, size)
	res := call(t, m, FillPages(), kvm.Regs{RSI: base, RDI: base + size, RDX: seed, RBX: 4096}, Handlers{})
	if _, ok := res.Port(PortDone); !ok {
		t.Fatalf("fill: %+v", res.Outs)
	}
	var want uint64
	for off := int64(0); off < size; off += 4096 {
		v, _ := ram.ReadUint64(off)
		if v != Pattern(base+uint64(off), seed) {
			t.Fatalf("offset %#x: %#x", off, v)
		}
		want += v
	}
	res = call(t, m, SumPages(), kvm.Regs{RSI: base, RDI: base + size, RBX: 4096}, Handlers{})
	if got, _ := res.Port64(PortLo, PortHi); got != want {
		t.Fatalf("sum %#x, want %#x", got, want)
	}
	res = call(t, m, VerifyPages(), kvm.Regs{RSI: base, RDI: base + size, RDX: seed, RBX: 4096}, Handlers{})
	if _, failed := res.Port(PortFail); failed {
		t.Fatalf("verify failed: %+v", res.Outs)
	}
}
