//go:build amd64

package vmm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/gmem-vmm/gmem/kvm"
)

// StateVersion is the version of the state record Save writes and Restore
// reads. docs/vmm.md specifies it.
const StateVersion = 1

// The state record: everything Save writes besides guest memory, and before
// it. docs/vmm.md has the format; in short:
//
//	header   magic "GMEMVMST", version u32, sections u32, body bytes u64
//	body     sections, each: tag [4]byte, length u32, data
//	trailer  CRC-32C (Castagnoli) of header and body, u32
//
// all little-endian. Each section holds one kernel structure as KVM_GET_*
// returns it, so a record restores exactly what was saved.
const (
	stateMagic      = "GMEMVMST"
	stateHeaderSize = 24
	maxStateBody    = 1 << 20 // far above the ~10 KiB a record takes
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// machineState is a VM's state besides guest memory: its one vCPU, its
// in-kernel interrupt controllers and PIT, kvm-clock, and the UART.
type machineState struct {
	Regs      kvm.Regs
	Sregs     kvm.Sregs
	FPU       []byte // struct kvm_fpu; set when XSAVE is not
	XSAVE     []byte // struct kvm_xsave, as long as KVM_GET_XSAVE2 makes it
	XCRS      []byte // struct kvm_xcrs; nil without KVM_CAP_XCRS
	MSRs      []msr
	LAPIC     []byte // struct kvm_lapic_state
	Events    []byte // struct kvm_vcpu_events
	MPState   []byte // struct kvm_mp_state
	DebugRegs []byte // struct kvm_debugregs; nil without KVM_CAP_DEBUGREGS
	PICMaster []byte // struct kvm_irqchip, chip 0
	PICSlave  []byte // struct kvm_irqchip, chip 1
	IOAPIC    []byte // struct kvm_irqchip, chip 2
	PIT       []byte // struct kvm_pit_state2
	Clock     []byte // struct kvm_clock_data
	UART      uartState
}

// msr is one model-specific register (struct kvm_msr_entry).
type msr struct {
	Index uint32
	Data  uint64
}

// sectionRule says how long a section must be and whether it must be there.
type sectionRule struct {
	tag      string
	size     int  // exact size; 0: see multiple
	multiple int  // the size is a positive multiple of this (with size 0)
	min      int  // and at least this
	optional bool // may be absent
}

// stateSections lists the sections in the order Save writes them.
var stateSections = []sectionRule{
	{tag: "REGS", size: 144},
	{tag: "SREG", size: 312},
	{tag: "FPU ", size: sizeFPU, optional: true},
	{tag: "XSAV", multiple: 4, min: sizeXSAVE, optional: true},
	{tag: "XCRS", size: sizeXCRS, optional: true},
	{tag: "MSRS", multiple: sizeMSREntry, optional: true},
	{tag: "LAPC", size: sizeLAPIC},
	{tag: "EVNT", size: sizeEvents},
	{tag: "MPST", size: sizeMPState},
	{tag: "DBRG", size: sizeDebugRegs, optional: true},
	{tag: "PICM", size: sizeIRQChip},
	{tag: "PICS", size: sizeIRQChip},
	{tag: "IOAP", size: sizeIRQChip},
	{tag: "PIT2", size: sizePIT2},
	{tag: "CLCK", size: sizeClock},
	{tag: "UART", size: sizeUARTState},
}

// fields returns the sections' data in stateSections' order, nil for an
// absent one.
func (s *machineState) fields() [][]byte {
	var regs, sregs bytes.Buffer
	_ = binary.Write(&regs, binary.LittleEndian, s.Regs) // fixed-size: cannot fail
	_ = binary.Write(&sregs, binary.LittleEndian, s.Sregs)
	var msrs []byte
	for _, m := range s.MSRs {
		msrs = binary.LittleEndian.AppendUint32(msrs, m.Index)
		msrs = binary.LittleEndian.AppendUint32(msrs, 0)
		msrs = binary.LittleEndian.AppendUint64(msrs, m.Data)
	}
	return [][]byte{regs.Bytes(), sregs.Bytes(), s.FPU, s.XSAVE, s.XCRS, msrs, s.LAPIC, s.Events, s.MPState,
		s.DebugRegs, s.PICMaster, s.PICSlave, s.IOAPIC, s.PIT, s.Clock, s.UART.marshal()}
}

// marshal encodes the state record.
func (s *machineState) marshal() []byte {
	var body []byte
	n := 0
	for i, f := range s.fields() {
		if f == nil {
			continue
		}
		body = append(body, stateSections[i].tag...)
		body = binary.LittleEndian.AppendUint32(body, uint32(len(f)))
		body = append(body, f...)
		n++
	}
	out := make([]byte, 0, stateHeaderSize+len(body)+4)
	out = append(out, stateMagic...)
	out = binary.LittleEndian.AppendUint32(out, StateVersion)
	out = binary.LittleEndian.AppendUint32(out, uint32(n))
	out = binary.LittleEndian.AppendUint64(out, uint64(len(body)))
	out = append(out, body...)
	return binary.LittleEndian.AppendUint32(out, crc32.Checksum(out, castagnoli))
}

// readState reads one state record from r, reading nothing past it, and
// checks it whole: a bad magic or section is ErrSnapshotFormat, another
// version ErrSnapshotVersion, a short stream ErrSnapshotTruncated, a bad
// checksum ErrSnapshotChecksum, each in a *StateError.
func readState(r io.Reader) (*machineState, error) {
	hdr := make([]byte, stateHeaderSize)
	if err := readFull(r, hdr, 0, "header"); err != nil {
		return nil, err
	}
	if string(hdr[:8]) != stateMagic {
		return nil, &StateError{Offset: 0, Err: fmt.Errorf("%w: magic %q, not %q (not a vmm snapshot)",
			ErrSnapshotFormat, hdr[:8], stateMagic)}
	}
	le := binary.LittleEndian
	if v := le.Uint32(hdr[8:]); v != StateVersion {
		return nil, &StateError{Offset: 8, Err: fmt.Errorf("%w: state record version %d (this package reads %d)",
			ErrSnapshotVersion, v, StateVersion)}
	}
	count, size := le.Uint32(hdr[12:]), le.Uint64(hdr[16:])
	if size > maxStateBody {
		return nil, &StateError{Offset: 16, Err: fmt.Errorf("%w: a body of %d bytes (at most %d)", ErrSnapshotFormat,
			size, maxStateBody)}
	}
	body := make([]byte, size+4)
	if err := readFull(r, body, stateHeaderSize, "body"); err != nil {
		return nil, err
	}
	body, sum := body[:size], le.Uint32(body[size:])
	crc := crc32.Update(crc32.Checksum(hdr, castagnoli), castagnoli, body)
	if crc != sum {
		return nil, &StateError{Offset: stateHeaderSize + int64(size), Err: fmt.Errorf("%w: CRC-32C %#08x, the record says %#08x",
			ErrSnapshotChecksum, crc, sum)}
	}
	return parseSections(body, count)
}

// readFull fills b from r; the stream ending first is ErrSnapshotTruncated.
func readFull(r io.Reader, b []byte, off int64, what string) error {
	n, err := io.ReadFull(r, b)
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return &StateError{Offset: off + int64(n), Err: fmt.Errorf("%w: the stream ends %d bytes into the record's %s of %d",
			ErrSnapshotTruncated, n, what, len(b))}
	case err != nil:
		return &StateError{Offset: off + int64(n), Err: fmt.Errorf("%w: reading the record's %s: %w", ErrSnapshotTruncated, what, err)}
	}
	return nil
}

// parseSections decodes the body, which the checksum has vouched for: its
// sections must be the known ones, in order, each of its size, with every
// required one present and exactly one of FPU and XSAV.
func parseSections(body []byte, count uint32) (*machineState, error) {
	le := binary.LittleEndian
	data := make([][]byte, len(stateSections))
	off, next := 0, 0
	bad := func(tag string, format string, args ...any) error {
		return &StateError{Offset: stateHeaderSize + int64(off), Section: tag,
			Err: fmt.Errorf("%w: "+format, append([]any{ErrSnapshotFormat}, args...)...)}
	}
	for i := uint32(0); i < count; i++ {
		if len(body)-off < 8 {
			return nil, bad("", "section %d of %d starts %d bytes before the body's end", i, count, len(body)-off)
		}
		tag, n := string(body[off:off+4]), int(le.Uint32(body[off+4:]))
		j := next
		for j < len(stateSections) && stateSections[j].tag != tag {
			j++
		}
		if j == len(stateSections) {
			return nil, bad(tag, "unknown, repeated or out of order")
		}
		rule := stateSections[j]
		if n > len(body)-off-8 {
			return nil, bad(tag, "%d bytes, past the body's end", n)
		}
		if rule.size != 0 && n != rule.size || rule.size == 0 && (n == 0 || n%rule.multiple != 0 || n < rule.min) {
			return nil, bad(tag, "%d bytes, not the structure's size", n)
		}
		data[j] = body[off+8 : off+8+n]
		off += 8 + n
		next = j + 1
	}
	if off != len(body) {
		return nil, bad("", "%d bytes after the last of the %d sections", len(body)-off, count)
	}
	for j, rule := range stateSections {
		if data[j] == nil && !rule.optional {
			return nil, bad(rule.tag, "missing")
		}
	}
	if (data[2] == nil) == (data[3] == nil) {
		return nil, bad("XSAV", "the record needs exactly one of FPU and XSAV")
	}
	s := &machineState{FPU: data[2], XSAVE: data[3], XCRS: data[4], LAPIC: data[6], Events: data[7], MPState: data[8],
		DebugRegs: data[9], PICMaster: data[10], PICSlave: data[11], IOAPIC: data[12], PIT: data[13], Clock: data[14]}
	_ = binary.Read(bytes.NewReader(data[0]), binary.LittleEndian, &s.Regs) // sizes checked above
	_ = binary.Read(bytes.NewReader(data[1]), binary.LittleEndian, &s.Sregs)
	for m := data[5]; len(m) > 0; m = m[sizeMSREntry:] {
		if le.Uint32(m[4:]) != 0 {
			return nil, bad("MSRS", "MSR %#x has a non-zero reserved field", le.Uint32(m))
		}
		s.MSRs = append(s.MSRs, msr{Index: le.Uint32(m), Data: le.Uint64(m[8:])})
	}
	u, ok := unmarshalUARTState(data[15])
	if !ok {
		return nil, bad("UART", "bits no UART register holds: % x", data[15])
	}
	s.UART = u
	return s, nil
}
