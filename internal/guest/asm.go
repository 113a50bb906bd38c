//go:build amd64

package guest

import (
	"encoding/binary"
	"fmt"
)

// Reg is an x86-64 general-purpose register, numbered as in the encoding.
type Reg uint8

// The registers.
const (
	RAX Reg = iota
	RCX
	RDX
	RBX
	RSP
	RBP
	RSI
	RDI
	R8
	R9
	R10
	R11
	R12
	R13
	R14
	R15
)

// Asm assembles 64-bit code. Labels may be used before they are defined;
// Bytes resolves them.
type Asm struct {
	b      []byte
	labels map[string]int
	dups   []string // labels defined more than once
	fixups []fixup
}

type fixup struct {
	at    int // offset of the rel32
	label string
}

func (a *Asm) rex(reg, rm Reg) {
	a.b = append(a.b, 0x48|byte(reg>>3)<<2|byte(rm>>3))
}

// modrmReg emits a register-direct ModRM.
func (a *Asm) modrmReg(reg, rm Reg) { a.b = append(a.b, 0xC0|byte(reg&7)<<3|byte(rm&7)) }

// modrmMem emits ModRM (and SIB or disp8) for [base].
func (a *Asm) modrmMem(reg, base Reg) {
	switch base & 7 {
	case 4: // RSP, R12: need a SIB byte
		a.b = append(a.b, byte(reg&7)<<3|4, 0x24)
	case 5: // RBP, R13: mod 00 means RIP-relative, so use disp8 0
		a.b = append(a.b, 0x40|byte(reg&7)<<3|5, 0)
	default:
		a.b = append(a.b, byte(reg&7)<<3|byte(base&7))
	}
}

// MovImm: mov r, imm64.
func (a *Asm) MovImm(r Reg, v uint64) {
	a.b = append(a.b, 0x48|byte(r>>3), 0xB8+byte(r&7))
	a.b = binary.LittleEndian.AppendUint64(a.b, v)
}

// Mov: mov dst, src.
func (a *Asm) Mov(dst, src Reg) { a.rex(src, dst); a.b = append(a.b, 0x89); a.modrmReg(src, dst) }

// Load: mov dst, [base].
func (a *Asm) Load(dst, base Reg) { a.rex(dst, base); a.b = append(a.b, 0x8B); a.modrmMem(dst, base) }

// Store: mov [base], src.
func (a *Asm) Store(base, src Reg) { a.rex(src, base); a.b = append(a.b, 0x89); a.modrmMem(src, base) }

// Add: add dst, src.
func (a *Asm) Add(dst, src Reg) { a.rex(src, dst); a.b = append(a.b, 0x01); a.modrmReg(src, dst) }

// AddMem: add dst, [base].
func (a *Asm) AddMem(dst, base Reg) { a.rex(dst, base); a.b = append(a.b, 0x03); a.modrmMem(dst, base) }

// AddImm: add r, imm32 (sign-extended).
func (a *Asm) AddImm(r Reg, v int32) {
	a.rex(0, r)
	a.b = append(a.b, 0x81)
	a.modrmReg(0, r)
	a.b = binary.LittleEndian.AppendUint32(a.b, uint32(v))
}

// Xor: xor dst, src.
func (a *Asm) Xor(dst, src Reg) { a.rex(src, dst); a.b = append(a.b, 0x31); a.modrmReg(src, dst) }

// Cmp: cmp x, y (flags of x - y).
func (a *Asm) Cmp(x, y Reg) { a.rex(y, x); a.b = append(a.b, 0x39); a.modrmReg(y, x) }

// CmpMem: cmp x, [base].
func (a *Asm) CmpMem(x, base Reg) { a.rex(x, base); a.b = append(a.b, 0x3B); a.modrmMem(x, base) }

// Dec: dec r.
func (a *Asm) Dec(r Reg) { a.rex(0, r); a.b = append(a.b, 0xFF); a.modrmReg(1, r) }

// Shr: shr r, n.
func (a *Asm) Shr(r Reg, n uint8) {
	a.rex(0, r)
	a.b = append(a.b, 0xC1)
	a.modrmReg(5, r)
	a.b = append(a.b, n)
}

// Out: out port, eax (32 bits of RAX).
func (a *Asm) Out(port uint8) { a.b = append(a.b, 0xE7, port) }

// In: in eax, port (32 bits, zero-extended into RAX).
func (a *Asm) In(port uint8) { a.b = append(a.b, 0xE5, port) }

// Hlt: hlt.
func (a *Asm) Hlt() { a.b = append(a.b, 0xF4) }

func (a *Asm) jump(op []byte, label string) {
	a.b = append(a.b, op...)
	a.fixups = append(a.fixups, fixup{at: len(a.b), label: label})
	a.b = append(a.b, 0, 0, 0, 0)
}

// Jmp: jmp label.
func (a *Asm) Jmp(label string) { a.jump([]byte{0xE9}, label) }

// Jnz: jnz label (also jne).
func (a *Asm) Jnz(label string) { a.jump([]byte{0x0F, 0x85}, label) }

// Jz: jz label (also je).
func (a *Asm) Jz(label string) { a.jump([]byte{0x0F, 0x84}, label) }

// Jb: jb label (unsigned below).
func (a *Asm) Jb(label string) { a.jump([]byte{0x0F, 0x82}, label) }

// Label defines label at the current position.
func (a *Asm) Label(name string) {
	if a.labels == nil {
		a.labels = map[string]int{}
	}
	if _, ok := a.labels[name]; ok {
		a.dups = append(a.dups, name)
	}
	a.labels[name] = len(a.b)
}

// Bytes resolves labels and returns the machine code. A label used but
// never defined, or defined twice, is an error.
func (a *Asm) Bytes() ([]byte, error) {
	if len(a.dups) > 0 {
		return nil, fmt.Errorf("guest: label %q defined more than once", a.dups[0])
	}
	out := append([]byte(nil), a.b...)
	for _, f := range a.fixups {
		t, ok := a.labels[f.label]
		if !ok {
			return nil, fmt.Errorf("guest: undefined label %q", f.label)
		}
		binary.LittleEndian.PutUint32(out[f.at:], uint32(int32(t-(f.at+4))))
	}
	return out, nil
}
