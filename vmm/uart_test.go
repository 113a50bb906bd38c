//go:build amd64

package vmm

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// testUART is a uart whose interrupt line and transmitted bytes are
// recorded.
type testUART struct {
	uart
	levels []bool
	out    []byte
}

func newTestUART() *testUART {
	u := &testUART{}
	u.setIRQ = func(l bool) { u.levels = append(u.levels, l) }
	return u
}

func (u *testUART) out8(off uint16, v byte) {
	if c, ok := u.write(off, v); ok {
		u.out = append(u.out, c)
	}
}

// TestUARTPassesLinuxProbe runs the probe of Linux's 8250 driver
// (autoconfig in drivers/tty/serial/8250/8250_port.c) against the model:
// the UART must be found, and found to be a 16550A with working FIFOs.
func TestUARTPassesLinuxProbe(t *testing.T) {
	u := newTestUART()
	// The scratch register holds what is written.
	u.out8(uartSCR, 0xa5)
	require.Equal(t, byte(0xa5), u.read(uartSCR))
	u.out8(uartSCR, 0x5a)
	require.Equal(t, byte(0x5a), u.read(uartSCR))
	// "IER test": 0 reads back 0, 0x0f reads back 0x0f.
	u.out8(uartIER, 0)
	require.Equal(t, byte(0), u.read(uartIER)&0x0f)
	u.out8(uartIER, 0x0f)
	require.Equal(t, byte(0x0f), u.read(uartIER)&0x0f)
	u.out8(uartIER, 0xff)
	require.Equal(t, byte(0x0f), u.read(uartIER), "IER holds four bits: not an XScale UART (UUE)")
	u.out8(uartIER, 0)
	// Loopback: MCR = LOOP | RTS | OUT2 reads back as MSR CTS | DCD.
	u.out8(uartMCR, mcrLoop|0x0a)
	require.Equal(t, byte(0x90), u.read(uartMSR)&0xf0)
	u.out8(uartMCR, mcrLoop|0x0f)
	require.Equal(t, byte(0xf0), u.read(uartMSR)&0xf0)
	u.out8(uartMCR, 0)
	require.Equal(t, byte(msrDCD|msrDSR|msrCTS), u.read(uartMSR), "a terminal is connected")
	// FIFOs: IIR's top bits say 16550A once FCR enables them.
	require.Equal(t, byte(0), u.read(uartIIR)>>6)
	u.out8(uartIIR, fcrEnable)
	require.Equal(t, byte(3), u.read(uartIIR)>>6)
	// With LCR = 0xbf (the EFR access key) offset 2 is not 0, so no EFR:
	// a plain 16550A.
	u.out8(uartLCR, 0xbf)
	require.NotZero(t, u.read(uartIIR))
	u.out8(uartLCR, 0x03) // 8N1
	require.Equal(t, byte(0x03), u.read(uartLCR))
	require.Empty(t, u.out, "probing transmits nothing")
	require.Equal(t, byte(lsrTHRE|lsrTEMT), u.read(uartLSR))
}

// TestUARTDivisorLatch: with LCR.DLAB set, offsets 0 and 1 are the divisor
// latch, and a write to offset 0 transmits nothing.
func TestUARTDivisorLatch(t *testing.T) {
	u := newTestUART()
	u.out8(uartIER, 0x05)
	u.out8(uartLCR, lcrDLAB|0x03)
	u.out8(uartRBR, 0x01) // 115200 baud
	u.out8(uartIER, 0x00)
	require.Equal(t, byte(0x01), u.read(uartRBR))
	require.Equal(t, byte(0x00), u.read(uartIER))
	u.out8(uartLCR, 0x03)
	require.Equal(t, byte(0x05), u.read(uartIER), "IER is untouched by the DLM write")
	require.Equal(t, byte(0), u.read(uartRBR), "RBR: nothing received")
	require.Empty(t, u.out)
	require.Equal(t, uartState{DLL: 1, IER: 5, LCR: 3, THRPending: true}, u.state())
}

// TestUARTTransmits: THR writes reach the console, except in loopback.
func TestUARTTransmits(t *testing.T) {
	u := newTestUART()
	for _, c := range []byte("hello\n") {
		require.Equal(t, byte(lsrTHRE|lsrTEMT), u.read(uartLSR), "the transmitter is always empty")
		u.out8(uartRBR, c)
	}
	u.out8(uartMCR, mcrLoop)
	u.out8(uartRBR, 'x')
	u.out8(uartMCR, 0)
	u.out8(uartRBR, '!')
	require.Equal(t, "hello\n!", string(u.out))
	require.Empty(t, u.levels, "with IER 0 the interrupt line never moves")
}

// TestUARTTHREInterrupt follows the THR-empty interrupt as Linux's driver
// uses it: enabling it raises the line; reading IIR identifies and clears
// it; each byte written raises it again, with an edge; disabling it lowers
// the line.
func TestUARTTHREInterrupt(t *testing.T) {
	u := newTestUART()
	u.out8(uartIER, ierTHRI)
	require.Equal(t, []bool{true}, u.levels, "enabling THRI with THR empty raises the line")
	require.Equal(t, byte(iirTHRI), u.read(uartIIR))
	require.Equal(t, []bool{true, false}, u.levels, "reading IIR clears the THR-empty interrupt")
	require.Equal(t, byte(iirNoInt), u.read(uartIIR), "and it stays clear")
	u.out8(uartRBR, 'a')
	require.Equal(t, []bool{true, false, true}, u.levels, "the byte went out: THR is empty again")
	u.out8(uartRBR, 'b')
	require.Equal(t, []bool{true, false, true, false, true}, u.levels, "an edge for each byte")
	u.out8(uartIER, 0)
	require.Equal(t, []bool{true, false, true, false, true, false}, u.levels)
	require.Equal(t, byte(iirNoInt), u.read(uartIIR))
	// Linux's startup test: IER = THRI, read IIR, IER = 0, IER = THRI, read
	// IIR again; a UART that does not reassert THRE gets UART_BUG_THRE.
	u.out8(uartIER, ierTHRI)
	iir1 := u.read(uartIIR)
	u.out8(uartIER, 0)
	u.out8(uartIER, ierTHRI)
	iir2 := u.read(uartIIR)
	require.Zero(t, iir1&iirNoInt)
	require.Zero(t, iir2&iirNoInt, "THRE is reasserted")
	require.Equal(t, "ab", string(u.out))
	// With the FIFOs on, IIR reports them with the interrupt.
	u.out8(uartIIR, fcrEnable)
	u.out8(uartIER, ierTHRI)
	require.Equal(t, byte(iirFIFO|iirTHRI), u.read(uartIIR))
}

// TestUARTStateEncoding: the state record's UART section round-trips, and
// bits no register holds are refused.
func TestUARTStateEncoding(t *testing.T) {
	for _, s := range []uartState{
		{},
		{DLL: 1, DLM: 2, IER: 0x0f, LCR: 0x83, MCR: 0x1f, SCR: 0xee, FCR: 0xc9, THRPending: true, Line: true},
		{IER: 2, THRPending: true},
	} {
		b := s.marshal()
		require.Len(t, b, sizeUARTState)
		got, ok := unmarshalUARTState(b)
		require.True(t, ok)
		require.Equal(t, s, got)
	}
	for _, b := range [][]byte{
		{0, 0, 0x10, 0, 0, 0, 0, 0}, // IER bit 4
		{0, 0, 0, 0, 0x20, 0, 0, 0}, // MCR bit 5
		{0, 0, 0, 0, 0, 0, 0x02, 0}, // FCR bit 1 (a FIFO reset, which does not stick)
		{0, 0, 0, 0, 0, 0, 0, 0x04}, // an unknown flag
		{0, 0, 0, 0, 0, 0, 0},       // short
	} {
		_, ok := unmarshalUARTState(b)
		require.False(t, ok, "% x", b)
	}
}
