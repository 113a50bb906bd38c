//go:build amd64

package vmm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/kvm"
)

// sampleState is a machine state with every section, each filled with a
// pattern of its own.
func sampleState(xsave bool) *machineState {
	fill := func(n int, seed byte) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = seed + byte(i*7)
		}
		return b
	}
	st := &machineState{
		Regs: kvm.Regs{RAX: 1, RBX: 0x6000, RIP: 0x1000850, RFLAGS: 0x202, R15: 0xffff},
		Sregs: kvm.Sregs{CS: kvm.Segment{Base: 0, Limit: 0xffffffff, Selector: 0x10, Typ: 11, Present: 1, S: 1, L: 1, G: 1},
			GDT: kvm.Descriptor{Base: 0x500, Limit: 47}, CR0: kvm.CR0PE | kvm.CR0PG, CR3: 0x9000, CR4: kvm.CR4PAE,
			EFER: kvm.EFERLME | kvm.EFERLMA, ApicBase: 0xfee00900, InterruptBitmap: [4]uint64{0, 1 << 3}},
		XCRS:      fill(sizeXCRS, 3),
		MSRs:      []msr{{0x10, 123456789}, {0xc0000082, 0xffffffff81e00000}, {msrTSCDeadline, 0}},
		LAPIC:     fill(sizeLAPIC, 4),
		Events:    fill(sizeEvents, 5),
		MPState:   []byte{3, 0, 0, 0},
		DebugRegs: fill(sizeDebugRegs, 6),
		PICMaster: fill(sizeIRQChip, 7),
		PICSlave:  fill(sizeIRQChip, 8),
		IOAPIC:    fill(sizeIRQChip, 9),
		PIT:       fill(sizePIT2, 10),
		Clock:     fill(sizeClock, 11),
		UART:      uartState{LCR: 3, IER: 2, FCR: 0xc1, THRPending: true},
	}
	if xsave {
		st.XSAVE = fill(sizeXSAVE+64, 1)
	} else {
		st.FPU = fill(sizeFPU, 2)
	}
	return st
}

// TestStateRoundTrip: a state record reads back as written, and reading it
// consumes exactly its bytes, leaving guest memory's stream after it.
func TestStateRoundTrip(t *testing.T) {
	require.Equal(t, 144, binary.Size(kvm.Regs{}))
	require.Equal(t, 312, binary.Size(kvm.Sregs{}))
	for _, xsave := range []bool{true, false} {
		st := sampleState(xsave)
		rec := st.marshal()
		r := bytes.NewReader(append(rec, "after"...))
		got, err := readState(r)
		require.NoError(t, err)
		require.Equal(t, st, got)
		rest, _ := io.ReadAll(r)
		require.Equal(t, "after", string(rest), "nothing past the record is read")
		require.Equal(t, stateMagic, string(rec[:8]))
		require.Equal(t, uint32(StateVersion), binary.LittleEndian.Uint32(rec[8:]))
	}
	// Optional sections may be left out.
	st := sampleState(false)
	st.XCRS, st.DebugRegs, st.MSRs = nil, nil, nil
	got, err := readState(bytes.NewReader(st.marshal()))
	require.NoError(t, err)
	require.Equal(t, st, got)
	require.Equal(t, uint32(len(stateSections)-4), binary.LittleEndian.Uint32(st.marshal()[12:]),
		"no XSAV, XCRS, MSRS, DBRG")
}

// reseal recomputes a record's checksum after the test changed it, so that
// the structural checks behind the checksum are reached.
func reseal(rec []byte) []byte {
	n := len(rec) - 4
	binary.LittleEndian.PutUint32(rec[n:], crc32.Checksum(rec[:n], castagnoli))
	return rec
}

// section returns the offset of section tag's header in rec.
func section(t *testing.T, rec []byte, tag string) int {
	for off := stateHeaderSize; off+8 <= len(rec)-4; {
		if string(rec[off:off+4]) == tag {
			return off
		}
		off += 8 + int(binary.LittleEndian.Uint32(rec[off+4:]))
	}
	t.Fatalf("no section %q", tag)
	return 0
}

// TestStateErrors: every way a record can be wrong is a *StateError with
// the snapshot sentinel for it.
func TestStateErrors(t *testing.T) {
	good := sampleState(true).marshal()
	mod := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	for _, tc := range []struct {
		name    string
		rec     []byte
		want    error
		section string
		msg     string
	}{
		{"empty", nil, ErrSnapshotTruncated, "", "ends 0 bytes into the record's header"},
		{"short header", good[:10], ErrSnapshotTruncated, "", "ends 10 bytes into the record's header"},
		{"short body", good[:100], ErrSnapshotTruncated, "", "record's body"},
		{"no checksum", good[:len(good)-2], ErrSnapshotTruncated, "", "record's body"},
		{"guest memory instead", mod(func(b []byte) []byte { copy(b, "GMEMSNAP"); return b }), ErrSnapshotFormat, "",
			"not a vmm snapshot"},
		{"version 2", mod(func(b []byte) []byte { b[8] = 2; return b }), ErrSnapshotVersion, "", "version 2"},
		{"huge body", mod(func(b []byte) []byte { binary.LittleEndian.PutUint64(b[16:], 1<<40); return b }),
			ErrSnapshotFormat, "", "a body of 1099511627776 bytes"},
		{"flipped bit in a register", mod(func(b []byte) []byte { b[section(t, b, "REGS")+8] ^= 1; return b }),
			ErrSnapshotChecksum, "", "CRC-32C"},
		{"flipped bit in the header", mod(func(b []byte) []byte { b[12] ^= 0x80; return b }), ErrSnapshotChecksum, "", "CRC-32C"},
		{"flipped checksum", mod(func(b []byte) []byte { b[len(b)-1] ^= 1; return b }), ErrSnapshotChecksum, "", "CRC-32C"},
		{"unknown section", mod(func(b []byte) []byte { copy(b[section(t, b, "LAPC"):], "LAPX"); return reseal(b) }),
			ErrSnapshotFormat, "LAPX", "unknown, repeated or out of order"},
		{"sections out of order", mod(func(b []byte) []byte {
			r, s := section(t, b, "REGS"), section(t, b, "SREG")
			regs := bytes.Clone(b[r:s])
			sreg := bytes.Clone(b[s : s+8+312])
			copy(b[r:], sreg)
			copy(b[r+len(sreg):], regs)
			return reseal(b)
		}), ErrSnapshotFormat, "REGS", "unknown, repeated or out of order"},
		{"wrong size", mod(func(b []byte) []byte {
			// PIT2 one byte shorter, the byte given to CLCK's header: the
			// body's length is unchanged.
			p := section(t, b, "PIT2")
			binary.LittleEndian.PutUint32(b[p+4:], sizePIT2-1)
			return reseal(b)
		}), ErrSnapshotFormat, "PIT2", "111 bytes, not the structure's size"},
		{"section past the end", mod(func(b []byte) []byte {
			binary.LittleEndian.PutUint32(b[section(t, b, "UART")+4:], 1000)
			return reseal(b)
		}), ErrSnapshotFormat, "UART", "1000 bytes, past the body's end"},
		{"bad UART", mod(func(b []byte) []byte { b[section(t, b, "UART")+8+2] = 0xff; return reseal(b) }),
			ErrSnapshotFormat, "UART", "bits no UART register holds"},
		{"MSR reserved field", mod(func(b []byte) []byte { b[section(t, b, "MSRS")+8+4] = 1; return reseal(b) }),
			ErrSnapshotFormat, "MSRS", "MSR 0x10 has a non-zero reserved field"},
		{"fewer sections", mod(func(b []byte) []byte {
			binary.LittleEndian.PutUint32(b[12:], binary.LittleEndian.Uint32(b[12:])-1)
			return reseal(b)
		}), ErrSnapshotFormat, "", "bytes after the last of the"},
		{"more sections", mod(func(b []byte) []byte {
			binary.LittleEndian.PutUint32(b[12:], binary.LittleEndian.Uint32(b[12:])+1)
			return reseal(b)
		}), ErrSnapshotFormat, "", "starts 0 bytes before the body's end"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := readState(bytes.NewReader(tc.rec))
			var se *StateError
			require.ErrorAs(t, err, &se)
			require.ErrorIs(t, err, tc.want)
			require.Equal(t, tc.section, se.Section)
			require.Contains(t, err.Error(), tc.msg)
		})
	}

	// Structural rules on records a writer could make: without a required
	// section, with both or neither of FPU and XSAV.
	for _, tc := range []struct {
		name    string
		edit    func(*machineState)
		section string
	}{
		{"no LAPIC", func(s *machineState) { s.LAPIC = nil }, "LAPC"},
		{"no clock", func(s *machineState) { s.Clock = nil }, "CLCK"},
		{"both FPU and XSAVE", func(s *machineState) { s.FPU = make([]byte, sizeFPU) }, "XSAV"},
		{"neither FPU nor XSAVE", func(s *machineState) { s.XSAVE = nil }, "XSAV"},
		{"XSAVE too short", func(s *machineState) { s.XSAVE = s.XSAVE[:1024] }, "XSAV"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := sampleState(true)
			tc.edit(st)
			_, err := readState(bytes.NewReader(st.marshal()))
			var se *StateError
			require.ErrorAs(t, err, &se)
			require.ErrorIs(t, err, ErrSnapshotFormat)
			require.Equal(t, tc.section, se.Section)
		})
	}
}

// TestRestoreRefusesBadSnapshots: Restore reads the state record first and
// allocates nothing for a bad one; a good record followed by a bad memory
// stream is guestmem's *SnapshotError, with the memory it began to build
// released. Neither needs KVM.
func TestRestoreRefusesBadSnapshots(t *testing.T) {
	noLeaks(t)
	ctx := context.Background()
	rec := sampleState(true).marshal()

	bad := bytes.Clone(rec)
	bad[30] ^= 0x40
	_, err := Restore(ctx, bytes.NewReader(bad), Config{})
	var se *StateError
	require.ErrorAs(t, err, &se)
	require.ErrorIs(t, err, ErrSnapshotChecksum)

	_, err = Restore(ctx, bytes.NewReader(append(bytes.Clone(rec), bytes.Repeat([]byte("not guest memory"), 512)...)), Config{})
	var gse *guestmem.SnapshotError
	require.ErrorAs(t, err, &gse)
	require.ErrorIs(t, err, ErrSnapshotFormat, "vmm's sentinel is guestmem's")

	// A whole memory stream after it, truncated.
	mem, err := guestmem.New(guestmem.X86Layout(4 * kMiB))
	require.NoError(t, err)
	require.NoError(t, mem.WriteUint64(0x1000, 0xfeedface))
	var stream bytes.Buffer
	stream.Write(rec)
	_, err = mem.Save(ctx, &stream, guestmem.SaveOptions{})
	require.NoError(t, err)
	require.NoError(t, mem.Close())
	whole := stream.Bytes()
	_, err = Restore(ctx, bytes.NewReader(whole[:len(whole)-10]), Config{})
	require.ErrorIs(t, err, ErrSnapshotTruncated)

	// The right layout is checked against Size.
	_, err = Restore(ctx, bytes.NewReader(whole), Config{Size: 8 * kMiB, KVMPath: "/nonexistent/kvm"})
	require.ErrorIs(t, err, guestmem.ErrSnapshotLayout)

	// Intact, it gets as far as KVM: here a device that is not there.
	_, err = Restore(ctx, bytes.NewReader(whole), Config{Size: 4 * kMiB, KVMPath: "/nonexistent/kvm"})
	require.ErrorIs(t, err, kvm.ErrNoDevice)
	require.False(t, errors.Is(err, ErrSnapshotFormat))
}
