package arena

import (
	"encoding/binary"
	"errors"
	"io"
	"syscall"
)

// Accesses below are bounds-checked against the mapping and, in an Arena,
// against what is mapped: touching a reserved range is a *FaultError wrapping
// ErrFault and ErrNotMapped, never a crash. An access the hardware refuses
// anyway (PROT_NONE, a shared file truncated under the mapping) is caught and
// returned as a *FaultError too, with the number of bytes moved before it.

// checkAccess validates a byte range for an access and returns the error to
// give when part of it is not mapped.
func (m *Mapping) checkAccess(op string, off, n int64) error {
	if err := m.checkRange(op, off, n); err != nil {
		return err
	}
	if !m.ents.covers(off, n) {
		i := m.ents.first(off)
		bad := off
		for ; i < len(m.ents) && m.ents[i].off <= bad; i++ {
			bad = m.ents[i].end()
		}
		return &FaultError{Op: op, Offset: bad, Addr: m.addr + uintptr(bad), Done: 0, Err: ErrNotMapped}
	}
	return nil
}

// copyMapped moves n bytes between the mapping at off and buf (toMapping says
// which way) under fault protection. The first attempt copies everything at
// once; if it faults, the copy is redone a page at a time so that the count
// returned is exactly the bytes moved before the first faulting page.
func (m *Mapping) copyMapped(op string, buf []byte, off int64, toMapping bool) (int, error) {
	move := func(b []byte, addr uintptr) {
		if toMapping {
			copy(bytesAt(addr, len(b)), b)
		} else {
			copy(b, bytesAt(addr, len(b)))
		}
	}
	start := m.addr + uintptr(off)
	if _, faulted := catchFault(func() { move(buf, start) }); !faulted {
		return len(buf), nil
	}
	done := 0
	for done < len(buf) {
		addr := start + uintptr(done)
		chunk := min(len(buf)-done, int(pageSize-int64(addr)%pageSize))
		if fa, faulted := catchFault(func() { move(buf[done:done+chunk], addr) }); faulted {
			return done, &FaultError{Op: op, Offset: off + int64(done), Addr: fa, Done: int64(done)}
		}
		done += chunk
	}
	return done, nil
}

// ReadAt reads len(p) bytes at off into p (io.ReaderAt). A read that starts
// at the end of the mapping, or runs past it, reads what is there and returns
// io.EOF; one that starts beyond the end is an ErrOutOfRange error.
func (m *Mapping) ReadAt(p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	defer m.runlock(m.rlock())
	if off == m.size && !m.closed {
		return 0, io.EOF
	}
	n := int64(len(p))
	var eof bool
	if off >= 0 && off < m.size && n > m.size-off {
		n, eof = m.size-off, true
	}
	if err := m.checkAccess("ReadAt", off, n); err != nil {
		return 0, err
	}
	done, err := m.copyMapped("ReadAt", p[:n], off, false)
	if err == nil && eof {
		err = io.EOF
	}
	return done, err
}

// WriteAt writes p at off (io.WriterAt). A write that does not fit in the
// mapping writes nothing and returns an error wrapping ErrOutOfRange.
func (m *Mapping) WriteAt(p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	defer m.runlock(m.rlock())
	if err := m.checkAccess("WriteAt", off, int64(len(p))); err != nil {
		return 0, err
	}
	return m.copyMapped("WriteAt", p, off, true)
}

// readFixed and writeFixed move one small value with the same checks.
func (m *Mapping) readFixed(op string, off int64, b []byte) error {
	defer m.runlock(m.rlock())
	if err := m.checkAccess(op, off, int64(len(b))); err != nil {
		return err
	}
	_, err := m.copyMapped(op, b, off, false)
	return err
}

func (m *Mapping) writeFixed(op string, off int64, b []byte) error {
	defer m.runlock(m.rlock())
	if err := m.checkAccess(op, off, int64(len(b))); err != nil {
		return err
	}
	_, err := m.copyMapped(op, b, off, true)
	return err
}

// ReadUint8 reads the byte at off.
func (m *Mapping) ReadUint8(off int64) (uint8, error) {
	var b [1]byte
	err := m.readFixed("ReadUint8", off, b[:])
	return b[0], err
}

// ReadUint16 reads the little-endian 16-bit value at off.
func (m *Mapping) ReadUint16(off int64) (uint16, error) {
	var b [2]byte
	err := m.readFixed("ReadUint16", off, b[:])
	return binary.LittleEndian.Uint16(b[:]), err
}

// ReadUint32 reads the little-endian 32-bit value at off.
func (m *Mapping) ReadUint32(off int64) (uint32, error) {
	var b [4]byte
	err := m.readFixed("ReadUint32", off, b[:])
	return binary.LittleEndian.Uint32(b[:]), err
}

// ReadUint64 reads the little-endian 64-bit value at off.
func (m *Mapping) ReadUint64(off int64) (uint64, error) {
	var b [8]byte
	err := m.readFixed("ReadUint64", off, b[:])
	return binary.LittleEndian.Uint64(b[:]), err
}

// WriteUint8 writes the byte v at off.
func (m *Mapping) WriteUint8(off int64, v uint8) error {
	return m.writeFixed("WriteUint8", off, []byte{v})
}

// WriteUint16 writes v at off, little-endian.
func (m *Mapping) WriteUint16(off int64, v uint16) error {
	return m.writeFixed("WriteUint16", off, binary.LittleEndian.AppendUint16(nil, v))
}

// WriteUint32 writes v at off, little-endian.
func (m *Mapping) WriteUint32(off int64, v uint32) error {
	return m.writeFixed("WriteUint32", off, binary.LittleEndian.AppendUint32(nil, v))
}

// WriteUint64 writes v at off, little-endian.
func (m *Mapping) WriteUint64(off int64, v uint64) error {
	return m.writeFixed("WriteUint64", off, binary.LittleEndian.AppendUint64(nil, v))
}

// atomicOp runs fn on the naturally aligned size-byte word at off.
func (m *Mapping) atomicOp(op string, off, size int64, fn func(addr uintptr)) error {
	defer m.runlock(m.rlock())
	if err := m.checkAccess(op, off, size); err != nil {
		return err
	}
	if off%size != 0 {
		return &RangeError{Op: op, Offset: off, Length: size, Limit: m.size, Err: ErrUnaligned}
	}
	addr := m.addr + uintptr(off)
	if fa, faulted := catchFault(func() { fn(addr) }); faulted {
		return &FaultError{Op: op, Offset: off, Addr: fa}
	}
	return nil
}

// LoadUint32 atomically loads the 4-byte-aligned 32-bit word at off.
func (m *Mapping) LoadUint32(off int64) (v uint32, err error) {
	err = m.atomicOp("LoadUint32", off, 4, func(a uintptr) { v = atomicLoad32(a) })
	return v, err
}

// StoreUint32 atomically stores v into the 4-byte-aligned word at off.
func (m *Mapping) StoreUint32(off int64, v uint32) error {
	return m.atomicOp("StoreUint32", off, 4, func(a uintptr) { atomicStore32(a, v) })
}

// CompareAndSwapUint32 atomically replaces the 32-bit word at off with newV if
// it holds old, and reports whether it did.
func (m *Mapping) CompareAndSwapUint32(off int64, old, newV uint32) (swapped bool, err error) {
	err = m.atomicOp("CompareAndSwapUint32", off, 4, func(a uintptr) { swapped = atomicCAS32(a, old, newV) })
	return swapped, err
}

// LoadUint64 atomically loads the 8-byte-aligned 64-bit word at off.
func (m *Mapping) LoadUint64(off int64) (v uint64, err error) {
	err = m.atomicOp("LoadUint64", off, 8, func(a uintptr) { v = atomicLoad64(a) })
	return v, err
}

// StoreUint64 atomically stores v into the 8-byte-aligned word at off.
func (m *Mapping) StoreUint64(off int64, v uint64) error {
	return m.atomicOp("StoreUint64", off, 8, func(a uintptr) { atomicStore64(a, v) })
}

// CompareAndSwapUint64 atomically replaces the 64-bit word at off with newV if
// it holds old, and reports whether it did.
func (m *Mapping) CompareAndSwapUint64(off int64, old, newV uint64) (swapped bool, err error) {
	err = m.atomicOp("CompareAndSwapUint64", off, 8, func(a uintptr) { swapped = atomicCAS64(a, old, newV) })
	return swapped, err
}

// copyChunk bounds how much of the mapping one Read or Write call of a
// CopyFrom or CopyTo is handed.
const copyChunk = 1 << 20

// CopyFrom reads exactly n bytes from r into the mapping at off. Readers that
// are files read straight into the mapping (no intermediate buffer). It
// returns the bytes stored and, if r ends early, io.ErrUnexpectedEOF. As with
// io.CopyN, n == 0 copies nothing and is not an error.
func (m *Mapping) CopyFrom(off int64, r io.Reader, n int64) (int64, error) {
	return m.stream("CopyFrom", off, n, func(b []byte) (int, error) { return io.ReadFull(r, b) })
}

// CopyTo writes the n bytes at off to w and returns the bytes written.
func (m *Mapping) CopyTo(w io.Writer, off, n int64) (int64, error) {
	return m.stream("CopyTo", off, n, w.Write)
}

// stream hands the mapping's [off, off+n) to fn in chunks, catching faults
// raised inside fn and EFAULT returned by the kernel (a file's read or write
// into an unmapped page) alike.
func (m *Mapping) stream(op string, off, n int64, fn func([]byte) (int, error)) (int64, error) {
	if n == 0 {
		return 0, nil
	}
	defer m.runlock(m.rlock())
	if err := m.checkAccess(op, off, n); err != nil {
		return 0, err
	}
	m.inCopy.Enter(op) // fn runs user code with mu read-locked
	defer m.inCopy.Leave()
	var done int64
	for done < n {
		chunk := min(n-done, copyChunk)
		addr := m.addr + uintptr(off+done)
		var got int
		var err error
		if fa, faulted := catchFault(func() { got, err = fn(bytesAt(addr, int(chunk))) }); faulted {
			return done, &FaultError{Op: op, Offset: off + done, Addr: fa, Done: done}
		}
		done += int64(got)
		if errors.Is(err, syscall.EFAULT) {
			return done, &FaultError{Op: op, Offset: off + done, Addr: m.addr + uintptr(off+done), Done: done, Err: err}
		}
		if err == io.EOF && op == "CopyFrom" {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return done, &OpError{Op: op, Offset: off + done, Length: n - done, Err: err}
		}
	}
	return done, nil
}

// Bytes returns the mapped memory [off, off+n) itself, with no copy: for
// handing guest buffers to syscalls (readv, writev, io_uring) and to code
// that cannot take an io.ReaderAt. The range must be mapped. The slice is
// valid only while the range stays mapped: after Close or RemoveMapping of
// it, using the slice crashes the process. Accesses through it are not
// fault-protected and not synchronised with the guest; prefer ReadAt and
// WriteAt where a copy is acceptable.
func (m *Mapping) Bytes(off, n int64) ([]byte, error) {
	defer m.runlock(m.rlock())
	if err := m.checkAccess("Bytes", off, n); err != nil {
		return nil, err
	}
	return bytesAt(m.addr+uintptr(off), int(n)), nil
}
