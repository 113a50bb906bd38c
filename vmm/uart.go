//go:build amd64

package vmm

import "sync"

// COM1, the serial port the VMM models, and its interrupt line.
const (
	com1Base = 0x3f8
	com1IRQ  = 4
)

// Registers of an 8250-family UART, by offset from its base port. Some
// offsets hold two registers: one read, one written, or one with LCR.DLAB
// clear and one (the divisor latch) with it set.
const (
	uartRBR = 0 // read: receiver buffer; write: THR, transmitter holding; DLAB: DLL
	uartIER = 1 // interrupt enable; DLAB: DLM
	uartIIR = 2 // read: interrupt identification; write: FCR, FIFO control
	uartLCR = 3 // line control
	uartMCR = 4 // modem control
	uartLSR = 5 // line status (read only)
	uartMSR = 6 // modem status (read only)
	uartSCR = 7 // scratch
)

// Register bits.
const (
	ierTHRI = 0x02 // interrupt when the transmitter holding register is empty

	iirNoInt = 0x01 // no interrupt pending
	iirTHRI  = 0x02 // the pending interrupt: transmitter holding register empty
	iirFIFO  = 0xc0 // FIFOs enabled (a 16550A)

	fcrEnable = 0x01 // enable the FIFOs
	fcrSticky = 0xc9 // the FCR bits that stay: enable, DMA mode, trigger level

	lcrDLAB = 0x80 // divisor latch access

	mcrLoop = 0x10 // loopback: output goes to the receiver, not the line
	mcrMask = 0x1f

	lsrTHRE = 0x20 // transmitter holding register empty
	lsrTEMT = 0x40 // transmitter empty

	msrCTS = 0x10 // clear to send
	msrDSR = 0x20 // data set ready
	msrRI  = 0x40 // ring indicator
	msrDCD = 0x80 // data carrier detect
)

// uart is COM1 as a 16550A, reduced to what a console needs, in the way
// QEMU's and Firecracker's serial devices model it. The transmitter is
// infinitely fast: a byte written to THR reaches the console at once, so
// LSR always says "transmitter empty" (what earlyprintk and the console
// driver poll for), and the THR-empty interrupt is pending again right
// after every byte. There is no receiver: RBR reads 0 and no data is ever
// ready. Everything Linux's 8250 driver probes behaves as on hardware: the
// scratch register, IER (the low four bits), the FIFO bits of IIR once FCR
// enables them (so the port is found to be a 16550A), the loopback mode's
// modem status (MCR's outputs fed back to MSR's inputs), the divisor latch.
//
// The interrupt output follows QEMU's serial_update_irq: it is high while
// an enabled interrupt is pending (here only THR-empty, IER bit 1), and
// setIRQ is called with each new level. Reading IIR when it reports
// THR-empty clears that interrupt, as on hardware; writing THR clears it and
// the instant transmit raises it again, so every byte makes an edge.
//
// It is safe for concurrent use; setIRQ is called with the uart's lock
// held, and must not call back into it.
type uart struct {
	mu     sync.Mutex
	regs   uartState
	setIRQ func(level bool) // nil: no interrupt line
}

// uartState is the UART's register state: what a snapshot saves.
type uartState struct {
	DLL, DLM   byte // the divisor latch
	IER        byte
	LCR        byte
	MCR        byte
	SCR        byte
	FCR        byte // the sticky bits
	THRPending bool // a THR-empty interrupt is pending (cleared by reading IIR)
	Line       bool // the level last given to setIRQ
}

// sizeUARTState is the encoded size of uartState.
const sizeUARTState = 8

// marshal encodes the state as 8 bytes: DLL, DLM, IER, LCR, MCR, SCR, FCR
// and flags (bit 0 THRPending, bit 1 Line).
func (s uartState) marshal() []byte {
	var flags byte
	if s.THRPending {
		flags |= 1
	}
	if s.Line {
		flags |= 2
	}
	return []byte{s.DLL, s.DLM, s.IER, s.LCR, s.MCR, s.SCR, s.FCR, flags}
}

// unmarshalUARTState decodes marshal's 8 bytes; it reports false for bits
// no UART register can hold.
func unmarshalUARTState(b []byte) (uartState, bool) {
	if len(b) != sizeUARTState || b[2]&^0x0f != 0 || b[4]&^mcrMask != 0 || b[6]&^fcrSticky != 0 || b[7]&^3 != 0 {
		return uartState{}, false
	}
	return uartState{DLL: b[0], DLM: b[1], IER: b[2], LCR: b[3], MCR: b[4], SCR: b[5], FCR: b[6],
		THRPending: b[7]&1 != 0, Line: b[7]&2 != 0}, true
}

func (u *uart) state() uartState {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.regs
}

func (u *uart) setState(s uartState) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.regs = s
}

// iir is the interrupt identification register's value.
func (s *uartState) iir() byte {
	id := byte(iirNoInt)
	if s.IER&ierTHRI != 0 && s.THRPending {
		id = iirTHRI
	}
	if s.FCR&fcrEnable != 0 {
		id |= iirFIFO
	}
	return id
}

// update drives the interrupt line to the level the registers call for.
func (u *uart) update() {
	level := u.regs.iir()&iirNoInt == 0
	if level != u.regs.Line {
		u.regs.Line = level
		if u.setIRQ != nil {
			u.setIRQ(level)
		}
	}
}

// read returns the register at offset off (0 to 7).
func (u *uart) read(off uint16) byte {
	u.mu.Lock()
	defer u.mu.Unlock()
	s := &u.regs
	dlab := s.LCR&lcrDLAB != 0
	switch off {
	case uartRBR:
		if dlab {
			return s.DLL
		}
		return 0 // no receiver: nothing ever arrives
	case uartIER:
		if dlab {
			return s.DLM
		}
		return s.IER
	case uartIIR:
		v := s.iir()
		if v&0x0f == iirTHRI {
			s.THRPending = false
			u.update()
		}
		return v
	case uartLCR:
		return s.LCR
	case uartMCR:
		return s.MCR
	case uartLSR:
		return lsrTHRE | lsrTEMT
	case uartMSR:
		if s.MCR&mcrLoop != 0 {
			// Loopback: DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
			m := s.MCR
			return (m&0x01)<<5 | (m&0x02)<<3 | (m&0x04)<<4 | (m&0x08)<<4
		}
		return msrDCD | msrDSR | msrCTS // a terminal is connected and ready
	case uartSCR:
		return s.SCR
	}
	return 0xff
}

// write sets the register at offset off (0 to 7) to v. A byte written to
// THR is returned with tx true, for the console; not in loopback mode,
// where it would go to the (absent) receiver.
func (u *uart) write(off uint16, v byte) (out byte, tx bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	s := &u.regs
	dlab := s.LCR&lcrDLAB != 0
	switch off {
	case uartRBR:
		if dlab {
			s.DLL = v
			return 0, false
		}
		s.THRPending = false
		u.update()
		s.THRPending = true // sent at once: THR is empty again
		u.update()
		return v, s.MCR&mcrLoop == 0
	case uartIER:
		if dlab {
			s.DLM = v
			return 0, false
		}
		s.IER = v & 0x0f
		s.THRPending = true // THR is always empty: enabling its interrupt raises it
		u.update()
	case uartIIR: // FCR
		s.FCR = v & fcrSticky
		u.update()
	case uartLCR:
		s.LCR = v
	case uartMCR:
		s.MCR = v & mcrMask
	case uartSCR:
		s.SCR = v
	}
	return 0, false
}
