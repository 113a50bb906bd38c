package guestmem

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"

	"github.com/gmem-vmm/gmem/arena"
)

// Errors of access by guest-physical address, wrapped in *AddressError.
var (
	// ErrHole: part of the range is not guest RAM (a gap in the layout).
	ErrHole = errors.New("address not in guest RAM")
	// ErrAddressOverflow: address + length overflows 64 bits.
	ErrAddressOverflow = errors.New("address plus length overflows")
	// ErrSpansRegions: a zero-copy slice was asked across a region boundary.
	ErrSpansRegions = errors.New("range spans more than one region")
)

// AddressError reports a guest-physical range that could not be accessed.
// A guest controls the addresses devices are asked to touch, so every
// access checks its whole range before touching anything.
type AddressError struct {
	Op  string       // the method
	GPA GuestAddress // the first address that is at fault
	Len uint64       // the length asked for
	Err error        // ErrHole, ErrAddressOverflow, ErrSpansRegions, ...
}

func (e *AddressError) Error() string {
	return fmt.Sprintf("guestmem: %s at %v (+%#x): %v", e.Op, e.GPA, e.Len, e.Err)
}

// Unwrap returns the sentinel.
func (e *AddressError) Unwrap() error { return e.Err }

// ErrFault is wrapped by the error of an access that faulted: a page of a
// File backing past the end of its truncated file (SIGBUS), or a page the
// host cannot reach. It is arena.ErrFault, so errors.Is matches either.
var ErrFault = arena.ErrFault

// ErrLocked is wrapped by the error of a call that cannot apply to pages
// locked by LockOnFault (Discard, DropPageCache): Unlock them first. It is
// arena.ErrLocked.
var ErrLocked = arena.ErrLocked

// inGuestTerms turns an error of the arena about piece pc into an
// *AddressError of op naming the guest-physical address at fault: a range
// the arena refused (a misaligned atomic), a fault part way (at the
// faulting page), or a syscall that failed on the piece. Errors that are not
// about memory (a writer's own error) keep their cause under the address.
func (pc piece) inGuestTerms(op string, err error) error {
	if err == nil {
		return nil
	}
	ae := &AddressError{Op: op, GPA: pc.gpa, Len: uint64(pc.n), Err: err}
	var re *arena.RangeError
	var fe *arena.FaultError
	var oe *arena.OpError
	switch {
	case errors.As(err, &re):
		ae.GPA, ae.Len, ae.Err = pc.gpa+GuestAddress(re.Offset-pc.off), uint64(re.Length), re.Err
		if errors.Is(re.Err, arena.ErrUnaligned) { // a misaligned atomic
			ae.Err = &alias{ours: ErrUnaligned, cause: re.Err}
		}
	case errors.As(err, &fe):
		ae.GPA, ae.Err = pc.gpa+GuestAddress(fe.Offset-pc.off), &faultCause{fe}
	case errors.As(err, &oe):
		ae.GPA, ae.Len, ae.Err = pc.gpa+GuestAddress(oe.Offset-pc.off), uint64(oe.Length), oe.Err
	}
	return ae
}

// alias is an arena error that also answers errors.Is for guestmem's
// sentinel of the same meaning; it reads as the arena's.
type alias struct{ ours, cause error }

func (a *alias) Error() string   { return a.cause.Error() }
func (a *alias) Unwrap() []error { return []error{a.ours, a.cause} }

// faultCause is an arena fault said in guest terms: what faulted is named
// by the AddressError around it, so only the cause and the host address
// remain.
type faultCause struct{ fe *arena.FaultError }

func (f *faultCause) Error() string {
	msg := fmt.Sprintf("%v at host address %#x after %d bytes", arena.ErrFault, f.fe.Addr, f.fe.Done)
	if f.fe.Err != nil {
		msg += ": " + f.fe.Err.Error()
	}
	return msg
}

// Unwrap returns the arena's fault: errors.Is(err, ErrFault) and
// errors.As(err, **arena.FaultError) both hold.
func (f *faultCause) Unwrap() error { return f.fe }

// piece is the part of a guest range that falls in one region.
type piece struct {
	region int
	a      *arena.Arena // the region's arena
	off    int64        // arena offset
	n      int64
	gpa    GuestAddress
}

// resolve maps [a, a+n) onto the regions. The range may cross region
// boundaries only where regions are contiguous in guest-physical space; any
// byte outside guest RAM is an *AddressError naming the first such address.
// The caller holds t (acquire).
func (t *table) resolve(op string, a GuestAddress, n uint64) ([]piece, error) {
	return t.resolveInto(nil, op, a, n)
}

// resolveInto is resolve appending to pieces, so a caller with a small
// array on its stack resolves without allocating.
func (t *table) resolveInto(pieces []piece, op string, a GuestAddress, n uint64) ([]piece, error) {
	if n > math.MaxUint64-uint64(a) {
		return nil, &AddressError{Op: op, GPA: a, Len: n, Err: ErrAddressOverflow}
	}
	i, ok := t.find(a)
	if !ok {
		return nil, &AddressError{Op: op, GPA: a, Len: n, Err: ErrHole}
	}
	pos, end := a, a+GuestAddress(n)
	for pos < end {
		if i == len(t.regions) || t.regions[i].GPA != pos && len(pieces) > 0 {
			return nil, &AddressError{Op: op, GPA: pos, Len: n, Err: ErrHole}
		}
		r := t.regions[i]
		take := min(end, r.End()) - pos
		pieces = append(pieces, piece{region: i, a: r.host, off: r.arenaOff + int64(pos-r.GPA), n: int64(take),
			gpa: pos})
		pos += take
		i++
	}
	return pieces, nil
}

// ReadAt reads len(p) bytes of guest memory at guest-physical address off
// (io.ReaderAt). A range that leaves guest RAM reads nothing and returns an
// *AddressError; a fault part way (a truncated backing file) returns the
// bytes read before it and an error wrapping arena.ErrFault.
func (m *Memory) ReadAt(p []byte, off int64) (int, error) {
	return m.transfer("ReadAt", p, off, false)
}

// WriteAt writes p into guest memory at guest-physical address off
// (io.WriterAt), with the same checks as ReadAt: nothing is written unless
// the whole range is guest RAM, and a fault part way reports how much was.
func (m *Memory) WriteAt(p []byte, off int64) (int, error) {
	return m.transfer("WriteAt", p, off, true)
}

func (m *Memory) transfer(op string, p []byte, off int64, write bool) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if off < 0 {
		return 0, &AddressError{Op: op, GPA: GuestAddress(off), Len: uint64(len(p)), Err: ErrHole}
	}
	t, err := m.acquire(op)
	if err != nil {
		return 0, err
	}
	defer t.release()
	var buf [2]piece
	pieces, err := t.resolveInto(buf[:0], op, GuestAddress(off), uint64(len(p)))
	if err != nil {
		return 0, err
	}
	if err := m.ensure(op, GuestAddress(off), uint64(len(p)), write); err != nil {
		return 0, err
	}
	done := 0
	for _, pc := range pieces {
		var n int
		if write {
			n, err = pc.a.WriteAt(p[done:done+int(pc.n)], pc.off)
			t.markDirty(pc, int64(n))
		} else {
			n, err = pc.a.ReadAt(p[done:done+int(pc.n)], pc.off)
		}
		done += n
		if err != nil {
			return done, pc.inGuestTerms(op, err)
		}
	}
	return done, nil
}

// ReadValue reads a fixed-size value (a number, or a struct or array of them;
// see encoding/binary) stored little-endian at a into v, which must be a
// pointer.
func (m *Memory) ReadValue(a GuestAddress, v any) error {
	size := binary.Size(v)
	if size < 0 {
		return fmt.Errorf("guestmem: ReadValue: %T is not a fixed-size value", v)
	}
	buf := make([]byte, size)
	if _, err := m.ReadAt(buf, int64(a)); err != nil {
		return err
	}
	_, err := binary.Decode(buf, binary.LittleEndian, v)
	return err
}

// WriteValue writes a fixed-size value little-endian at a.
func (m *Memory) WriteValue(a GuestAddress, v any) error {
	buf, err := binary.Append(nil, binary.LittleEndian, v)
	if err != nil {
		return fmt.Errorf("guestmem: WriteValue: %w", err)
	}
	_, err = m.WriteAt(buf, int64(a))
	return err
}

// one resolves a range that must lie in a single region, for the typed and
// atomic accessors, and runs fn on its arena and offset; write says fn may
// store, so the range is marked dirty while tracking.
func (m *Memory) one(op string, a GuestAddress, n uint64, write bool, fn func(ar *arena.Arena, off int64) error) error {
	t, err := m.acquire(op)
	if err != nil {
		return err
	}
	defer t.release()
	pieces, err := t.resolve(op, a, n)
	if err != nil {
		return err
	}
	if len(pieces) != 1 {
		return &AddressError{Op: op, GPA: a, Len: n, Err: ErrSpansRegions}
	}
	if err := m.ensure(op, a, n, write); err != nil {
		return err
	}
	err = fn(pieces[0].a, pieces[0].off)
	if write && err == nil {
		t.markDirty(pieces[0], pieces[0].n)
	}
	return pieces[0].inGuestTerms(op, err)
}

// The typed accessors read and write little-endian values with no
// allocation; a value may cross a boundary between contiguous regions, as
// with ReadAt.

// ReadUint8 reads the byte at a.
func (m *Memory) ReadUint8(a GuestAddress) (uint8, error) {
	var b [1]byte
	_, err := m.transfer("ReadUint8", b[:], int64(a), false)
	return b[0], err
}

// WriteUint8 writes v at a.
func (m *Memory) WriteUint8(a GuestAddress, v uint8) error {
	b := [1]byte{v}
	_, err := m.transfer("WriteUint8", b[:], int64(a), true)
	return err
}

// ReadUint16 reads the little-endian 16-bit value at a.
func (m *Memory) ReadUint16(a GuestAddress) (uint16, error) {
	var b [2]byte
	_, err := m.transfer("ReadUint16", b[:], int64(a), false)
	return binary.LittleEndian.Uint16(b[:]), err
}

// WriteUint16 writes v little-endian at a.
func (m *Memory) WriteUint16(a GuestAddress, v uint16) error {
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], v)
	_, err := m.transfer("WriteUint16", b[:], int64(a), true)
	return err
}

// ReadUint32 reads the little-endian 32-bit value at a.
func (m *Memory) ReadUint32(a GuestAddress) (uint32, error) {
	var b [4]byte
	_, err := m.transfer("ReadUint32", b[:], int64(a), false)
	return binary.LittleEndian.Uint32(b[:]), err
}

// WriteUint32 writes v little-endian at a.
func (m *Memory) WriteUint32(a GuestAddress, v uint32) error {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	_, err := m.transfer("WriteUint32", b[:], int64(a), true)
	return err
}

// ReadUint64 reads the little-endian 64-bit value at a.
func (m *Memory) ReadUint64(a GuestAddress) (uint64, error) {
	var b [8]byte
	_, err := m.transfer("ReadUint64", b[:], int64(a), false)
	return binary.LittleEndian.Uint64(b[:]), err
}

// WriteUint64 writes v little-endian at a.
func (m *Memory) WriteUint64(a GuestAddress, v uint64) error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	_, err := m.transfer("WriteUint64", b[:], int64(a), true)
	return err
}

// LoadUint32 atomically loads the naturally aligned 32-bit word at a.
func (m *Memory) LoadUint32(a GuestAddress) (v uint32, err error) {
	err = m.one("LoadUint32", a, 4, false, func(ar *arena.Arena, off int64) (err error) { v, err = ar.LoadUint32(off); return err })
	return v, err
}

// StoreUint32 atomically stores v into the naturally aligned word at a.
func (m *Memory) StoreUint32(a GuestAddress, v uint32) error {
	return m.one("StoreUint32", a, 4, true, func(ar *arena.Arena, off int64) error { return ar.StoreUint32(off, v) })
}

// CompareAndSwapUint32 atomically replaces the word at a with newV if it
// holds old, and reports whether it did.
func (m *Memory) CompareAndSwapUint32(a GuestAddress, old, newV uint32) (ok bool, err error) {
	err = m.one("CompareAndSwapUint32", a, 4, true, func(ar *arena.Arena, off int64) (err error) {
		ok, err = ar.CompareAndSwapUint32(off, old, newV)
		return err
	})
	return ok, err
}

// LoadUint64 atomically loads the naturally aligned 64-bit word at a.
func (m *Memory) LoadUint64(a GuestAddress) (v uint64, err error) {
	err = m.one("LoadUint64", a, 8, false, func(ar *arena.Arena, off int64) (err error) { v, err = ar.LoadUint64(off); return err })
	return v, err
}

// StoreUint64 atomically stores v into the naturally aligned word at a.
func (m *Memory) StoreUint64(a GuestAddress, v uint64) error {
	return m.one("StoreUint64", a, 8, true, func(ar *arena.Arena, off int64) error { return ar.StoreUint64(off, v) })
}

// CompareAndSwapUint64 atomically replaces the word at a with newV if it
// holds old, and reports whether it did.
func (m *Memory) CompareAndSwapUint64(a GuestAddress, old, newV uint64) (ok bool, err error) {
	err = m.one("CompareAndSwapUint64", a, 8, true, func(ar *arena.Arena, off int64) (err error) {
		ok, err = ar.CompareAndSwapUint64(off, old, newV)
		return err
	})
	return ok, err
}

// Slice returns guest memory [a, a+n) itself, with no copy; the range must
// lie in one region (n == 0 gives an empty slice where a is guest RAM). The slice is valid until the region is removed or the
// Memory closed (Pin keeps it mapped), and accesses through it are not fault-protected: see
// arena.Mapping.Bytes. Writes through it are invisible to dirty tracking:
// call MarkDirty for what you wrote.
func (m *Memory) Slice(a GuestAddress, n uint64) (b []byte, err error) {
	if n == 0 { // an empty range inside guest RAM is an empty slice (vm-memory's get_slice)
		if _, err := m.Region(a); err != nil {
			if ae, ok := err.(*AddressError); ok {
				ae.Op = "Slice"
			}
			return nil, err
		}
		return []byte{}, nil
	}
	err = m.one("Slice", a, n, false, func(ar *arena.Arena, off int64) (err error) {
		b, err = ar.Bytes(off, int64(n))
		return err
	})
	return b, err
}

// CopyTo writes guest memory [a, a+n) to w, handing it guest memory itself.
// w runs holding the region table: it may read and write guest memory, but
// what would wait for the table (Close, AddRegion, RemoveRegion, Register,
// Unregister, Start/StopDirtyTracking) returns ErrReentered.
func (m *Memory) CopyTo(w io.Writer, a GuestAddress, n uint64) (int64, error) {
	t, err := m.acquire("CopyTo")
	if err != nil {
		return 0, err
	}
	defer t.release()
	if _, err := t.resolve("CopyTo", a, n); err != nil {
		return 0, err
	}
	if err := m.ensure("CopyTo", a, n, false); err != nil {
		return 0, err
	}
	m.inCallback.Enter("CopyTo") // w runs holding t
	defer m.inCallback.Leave()
	return t.copyTo("CopyTo", w, a, n)
}

// copyTo is CopyTo on a table the caller holds.
func (t *table) copyTo(op string, w io.Writer, a GuestAddress, n uint64) (int64, error) {
	pieces, err := t.resolve(op, a, n)
	if err != nil {
		return 0, err
	}
	var done int64
	for _, pc := range pieces {
		k, err := pc.a.CopyTo(w, pc.off, pc.n)
		done += k
		if err != nil {
			return done, pc.inGuestTerms(op, err)
		}
	}
	return done, nil
}

// CopyFrom reads n bytes from r into guest memory at a. r runs holding the
// region table, with CopyTo's rules for what it may call.
func (m *Memory) CopyFrom(a GuestAddress, r io.Reader, n uint64) (int64, error) {
	t, err := m.acquire("CopyFrom")
	if err != nil {
		return 0, err
	}
	defer t.release()
	pieces, err := t.resolve("CopyFrom", a, n)
	if err != nil {
		return 0, err
	}
	if err := m.ensure("CopyFrom", a, n, true); err != nil {
		return 0, err
	}
	m.inCallback.Enter("CopyFrom") // r runs holding t
	defer m.inCallback.Leave()
	var done int64
	for _, pc := range pieces {
		k, err := pc.a.CopyFrom(pc.off, r, pc.n)
		t.markDirty(pc, k)
		done += k
		if err != nil {
			return done, pc.inGuestTerms("CopyFrom", err)
		}
	}
	return done, nil
}
