//go:build amd64

package guest

import (
	"bytes"
	"strings"
	"testing"
)

// TestEncodings checks each instruction's bytes against the encoding in
// the Intel SDM, including the REX bits of R8-R15 and the ModRM forms that
// need a SIB byte (RSP, R12 as a base) or a displacement (RBP, R13).
func TestEncodings(t *testing.T) {
	for _, c := range []struct {
		name string
		emit func(a *Asm)
		want []byte
	}{
		{"mov rax, imm64", func(a *Asm) { a.MovImm(RAX, 0x1122334455667788) },
			[]byte{0x48, 0xB8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11}},
		{"mov r9, imm64", func(a *Asm) { a.MovImm(R9, 1) }, []byte{0x49, 0xB9, 1, 0, 0, 0, 0, 0, 0, 0}},
		{"mov rax, rsi", func(a *Asm) { a.Mov(RAX, RSI) }, []byte{0x48, 0x89, 0xF0}},
		{"mov r8, rax", func(a *Asm) { a.Mov(R8, RAX) }, []byte{0x49, 0x89, 0xC0}},
		{"mov r15, r9", func(a *Asm) { a.Mov(R15, R9) }, []byte{0x4D, 0x89, 0xCF}},
		{"mov rax, [rsi]", func(a *Asm) { a.Load(RAX, RSI) }, []byte{0x48, 0x8B, 0x06}},
		{"mov rax, [rbp+0]", func(a *Asm) { a.Load(RAX, RBP) }, []byte{0x48, 0x8B, 0x45, 0x00}},
		{"mov r10, [r13+0]", func(a *Asm) { a.Load(R10, R13) }, []byte{0x4D, 0x8B, 0x55, 0x00}},
		{"mov [rsi], rax", func(a *Asm) { a.Store(RSI, RAX) }, []byte{0x48, 0x89, 0x06}},
		{"mov [rsp], rax", func(a *Asm) { a.Store(RSP, RAX) }, []byte{0x48, 0x89, 0x04, 0x24}},
		{"mov [r12], rax", func(a *Asm) { a.Store(R12, RAX) }, []byte{0x49, 0x89, 0x04, 0x24}},
		{"mov [r13+0], rdx", func(a *Asm) { a.Store(R13, RDX) }, []byte{0x49, 0x89, 0x55, 0x00}},
		{"add rax, rbx", func(a *Asm) { a.Add(RAX, RBX) }, []byte{0x48, 0x01, 0xD8}},
		{"add rax, [rsi]", func(a *Asm) { a.AddMem(RAX, RSI) }, []byte{0x48, 0x03, 0x06}},
		{"add rcx, -1", func(a *Asm) { a.AddImm(RCX, -1) }, []byte{0x48, 0x81, 0xC1, 0xFF, 0xFF, 0xFF, 0xFF}},
		{"add r11, 0x1000", func(a *Asm) { a.AddImm(R11, 0x1000) }, []byte{0x49, 0x81, 0xC3, 0x00, 0x10, 0, 0}},
		{"xor rax, rdx", func(a *Asm) { a.Xor(RAX, RDX) }, []byte{0x48, 0x31, 0xD0}},
		{"cmp rsi, rdi", func(a *Asm) { a.Cmp(RSI, RDI) }, []byte{0x48, 0x39, 0xFE}},
		{"cmp rax, [rsi]", func(a *Asm) { a.CmpMem(RAX, RSI) }, []byte{0x48, 0x3B, 0x06}},
		{"dec rcx", func(a *Asm) { a.Dec(RCX) }, []byte{0x48, 0xFF, 0xC9}},
		{"dec r14", func(a *Asm) { a.Dec(R14) }, []byte{0x49, 0xFF, 0xCE}},
		{"shr rax, 32", func(a *Asm) { a.Shr(RAX, 32) }, []byte{0x48, 0xC1, 0xE8, 0x20}},
		{"out 0x10, eax", func(a *Asm) { a.Out(0x10) }, []byte{0xE7, 0x10}},
		{"in eax, 0x20", func(a *Asm) { a.In(0x20) }, []byte{0xE5, 0x20}},
		{"hlt", func(a *Asm) { a.Hlt() }, []byte{0xF4}},
	} {
		a := &Asm{}
		c.emit(a)
		got, err := a.Bytes()
		if err != nil || !bytes.Equal(got, c.want) {
			t.Errorf("%s: % x, %v; want % x", c.name, got, err, c.want)
		}
	}
}

func TestJumps(t *testing.T) {
	a := &Asm{}
	a.Label("top") // 0
	a.Jz("end")    // 0: 0F 84 rel32, next at 6
	a.Jnz("top")   // 6: 0F 85 rel32, next at 12
	a.Jb("top")    // 12: 0F 82 rel32, next at 18
	a.Jmp("top")   // 18: E9 rel32, next at 23
	a.Label("end") // 23
	a.Hlt()
	got, err := a.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	want := []byte{
		0x0F, 0x84, 23 - 6, 0, 0, 0,
		0x0F, 0x85, 0xF4, 0xFF, 0xFF, 0xFF, // -12
		0x0F, 0x82, 0xEE, 0xFF, 0xFF, 0xFF, // -18
		0xE9, 0xE9, 0xFF, 0xFF, 0xFF, // -23
		0xF4,
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("% x\nwant % x", got, want)
	}
	// Bytes does not change the program: a second call gives the same.
	if again, _ := a.Bytes(); !bytes.Equal(again, got) {
		t.Fatal("Bytes is not repeatable")
	}
}

func TestLabelErrors(t *testing.T) {
	a := &Asm{}
	a.Jmp("nowhere")
	if _, err := a.Bytes(); err == nil || !strings.Contains(err.Error(), `"nowhere"`) {
		t.Errorf("undefined label: %v", err)
	}
	a = &Asm{}
	a.Label("x")
	a.Hlt()
	a.Label("x")
	if _, err := a.Bytes(); err == nil || !strings.Contains(err.Error(), "more than once") {
		t.Errorf("label defined twice: %v", err)
	}
}

func TestResultPorts(t *testing.T) {
	r := Result{Outs: []Out{{PortLo, 1}, {PortHi, 2}, {PortLo, 3}, {PortDone, 0}}}
	if v, ok := r.Port(PortLo); !ok || v != 3 {
		t.Errorf("Port(PortLo) = %d, %v; want the last write, 3", v, ok)
	}
	if v, ok := r.Port64(PortLo, PortHi); !ok || v != 2<<32|3 {
		t.Errorf("Port64 = %#x, %v", v, ok)
	}
	if _, ok := r.Port(PortFail); ok {
		t.Error("Port(PortFail) found a write that never happened")
	}
	if _, ok := r.Port64(PortLo, PortFail); ok {
		t.Error("Port64 with one port never written says ok")
	}
	if Pattern(0x1000, 0xff) != 0x10ff {
		t.Error("Pattern")
	}
}
