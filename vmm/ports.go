//go:build amd64

package vmm

import (
	"encoding/binary"
	"fmt"

	"github.com/gmem-vmm/gmem/kvm"
)

// The ports a PC kernel pokes that the VMM answers itself. The PIC (0x20,
// 0xa0, the ELCR at 0x4d0), the PIT (0x40–0x43) and its speaker gate (0x61)
// are in the kernel (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2) and never exit.
// Everything else, from the POST port 0x80 and the CMOS clock at 0x70 to
// the PCI configuration ports, the other COM ports and the keyboard
// controller's data port, reads all ones, as a port with no device behind
// it does on a PC, and writes go nowhere: so the kernel finds no such
// device and moves on.
const (
	portI8042Command = 0x64  // keyboard controller command (write) and status (read)
	i8042ResetCPU    = 0xfe  // the command that pulses the CPU's reset line: Linux's "reboot=k", tried first
	portResetControl = 0xcf9 // the chipset's reset control register (PIIX, ICH): Linux's "reboot=pci"
	resetControlCPU  = 0x04  // its RST_CPU bit
)

// io serves a port I/O exit. A string instruction (rep ins, rep outs)
// gives Count accesses of Size bytes each; what the guest writes to COM1's
// transmitter goes to the console in one Write.
func (v *VM) io(x *kvm.IOExit) error {
	size, count := int(x.Size), int(x.Count)
	if size == 0 || len(x.Data) < size*count {
		return fmt.Errorf("vmm: port %#x: an I/O exit of %d × %d bytes with %d bytes of data", x.Port, count, size,
			len(x.Data))
	}
	var tx []byte
	reset := false
	for i := range count {
		b := x.Data[i*size : (i+1)*size]
		switch {
		case x.Port >= com1Base && x.Port < com1Base+8:
			// A wider access covers the registers after the first.
			for j := range b {
				off := x.Port - com1Base + uint16(j)
				switch {
				case off >= 8:
					if !x.Out {
						b[j] = 0xff
					}
				case x.Out:
					if c, ok := v.uart.write(off, b[j]); ok {
						tx = append(tx, c)
					}
				default:
					b[j] = v.uart.read(off)
				}
			}
		case x.Out:
			reset = reset || isResetRequest(x.Port, b)
		default:
			for j := range b {
				b[j] = 0xff
			}
		}
	}
	if len(tx) > 0 {
		_, _ = v.console.Write(tx) // the guest does not wait for its console
		v.stats.consoleBytes.Add(uint64(len(tx)))
	}
	if reset {
		return v.stopped("reset")
	}
	return nil
}

// isResetRequest reports whether writing b to port asks a PC to reset: the
// keyboard controller's reset command, or the reset control register's
// RST_CPU bit, each a one-byte write.
func isResetRequest(port uint16, b []byte) bool {
	if len(b) != 1 {
		return false
	}
	switch port {
	case portI8042Command:
		return b[0] == i8042ResetCPU
	case portResetControl:
		return b[0]&resetControlCPU != 0
	}
	return false
}

// setIRQLine drives COM1's interrupt line (IRQ 4) to level: KVM_IRQ_LINE,
// which the in-kernel PIC and IOAPIC both see. Errors are dropped: the line
// only fails once the VM is closing.
func (v *VM) setIRQLine(level bool) {
	b := make([]byte, sizeIRQLevel)
	binary.LittleEndian.PutUint32(b, com1IRQ)
	if level {
		binary.LittleEndian.PutUint32(b[4:], 1)
	}
	_ = v.vmIoctl("KVM_IRQ_LINE", reqIRQLine, b)
}
