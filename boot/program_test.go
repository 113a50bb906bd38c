//go:build amd64

package boot_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
)

// Ports the E820 walker reports on.
const (
	portCount   = 0x14 // low 32 bits of the page count, then (portCount+1) the high
	portSum     = 0x16 // low 32 bits of the address sum, then (portSum+1) the high
	portEntries = 0x18 // the number of E820 entries it read
)

// e820Walker is the 64-bit entry of the test bzImage. Entered as the 64-bit
// boot protocol enters a kernel (RSI at boot_params), it reads
// e820_entries and e820_table from boot_params, and for every usable
// entry touches the first quadword of every page from the entry's start
// up to its end (reads it and writes the same value back: the page tables,
// boot_params and this code live in usable RAM too). It reports the number
// of pages touched and the sum of their addresses, then halts.
//
// The assembler's memory operands have no displacement and it has no AND
// or SHL, so a byte or a dword is read as the top of a quadword loaded
// that much lower, shifted down.
func e820Walker(t *testing.T) []byte {
	a := &guest.Asm{}
	a.Mov(guest.RCX, guest.RSI)
	a.AddImm(guest.RCX, 0x1e8-7)
	a.Load(guest.R8, guest.RCX) // e820_entries is the top byte
	a.Shr(guest.R8, 56)
	a.Mov(guest.RAX, guest.R8)
	a.Out(portEntries)
	a.Mov(guest.R9, guest.RSI)
	a.AddImm(guest.R9, 0x2d0)   // e820_table[0]
	a.Xor(guest.R10, guest.R10) // pages
	a.Xor(guest.R11, guest.R11) // sum of page addresses
	a.MovImm(guest.R12, 4096)
	a.MovImm(guest.R13, 1)
	a.Xor(guest.R14, guest.R14)
	a.Label("entry")
	a.Cmp(guest.R8, guest.R14)
	a.Jz("done")
	a.Mov(guest.RCX, guest.R9)
	a.AddImm(guest.RCX, 12)
	a.Load(guest.RAX, guest.RCX) // type is the top dword of [entry+12]
	a.Shr(guest.RAX, 32)
	a.Cmp(guest.RAX, guest.R13)
	a.Jnz("next")
	a.Load(guest.RBX, guest.R9) // addr
	a.Mov(guest.RCX, guest.R9)
	a.AddImm(guest.RCX, 8)
	a.Load(guest.RDX, guest.RCX) // size
	a.Add(guest.RDX, guest.RBX)  // end
	a.Label("page")
	a.Load(guest.RAX, guest.RBX)
	a.Store(guest.RBX, guest.RAX)
	a.Add(guest.R10, guest.R13)
	a.Add(guest.R11, guest.RBX)
	a.Add(guest.RBX, guest.R12)
	a.Cmp(guest.RBX, guest.RDX)
	a.Jb("page")
	a.Label("next")
	a.AddImm(guest.R9, 20)
	a.Dec(guest.R8)
	a.Jmp("entry")
	a.Label("done")
	for _, r := range []struct {
		reg  guest.Reg
		port uint8
	}{{guest.R10, portCount}, {guest.R11, portSum}} {
		a.Mov(guest.RAX, r.reg)
		a.Out(r.port)
		a.Shr(guest.RAX, 32)
		a.Out(r.port + 1)
	}
	a.Out(guest.PortDone)
	a.Hlt()
	b, err := a.Bytes()
	require.NoError(t, err)
	return b
}

// walkOf is what e820Walker reports for layout l, computed from the layout
// alone: its writable RAM less the BIOS area [0x9fc00, 1 MiB), page by page
// from the start of each piece.
func walkOf(l guestmem.Layout) (pages, sum uint64) {
	for _, r := range l {
		if r.ReadOnly {
			continue
		}
		pieces := [][2]uint64{{uint64(r.GPA), uint64(r.End())}}
		if r.GPA < 0x100000 {
			pieces = [][2]uint64{{uint64(r.GPA), min(uint64(r.End()), 0x9fc00)}, {0x100000, uint64(r.End())}}
		}
		for _, p := range pieces {
			for a := p[0]; a < p[1]; a += 4096 {
				pages++
				sum += a
			}
		}
	}
	return pages, sum
}
