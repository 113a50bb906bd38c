package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"os"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
)

// bigEndian: the log is a byte array (page p is bit p%8 of byte p/8), read
// and written here 64 bits at a time; on a big-endian host a word's bytes
// are reversed against that order.
var bigEndian = binary.NativeEndian.Uint16([]byte{0, 1}) == 1

// native converts a word between the log's byte order (bit k of the word is
// page k of its 64) and the host's; it is its own inverse.
func native(v uint64) uint64 {
	if bigEndian {
		return bits.ReverseBytes64(v)
	}
	return v
}

// dirtyLog is a mapped vhost-user dirty log: one bit per 4 KiB guest page
// from guest address 0, set and cleared atomically 64 bits at a time, since
// the other process changes it concurrently.
type dirtyLog struct {
	m    *arena.Mapping
	off  int64  // the log's first byte in m (the fd offset rounded down to a page)
	size uint64 // bytes of log
	fd   int    // the memfd, for a log this process made; -1 for a mapped one
}

// createLog makes a log covering guest addresses [0, end) in a new sealed
// memfd, mapped shared.
func createLog(end uint64) (*dirtyLog, error) {
	size := LogSize(end)
	fd, err := unix.MemfdCreate("vhost-user-log", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("vhostuser: creating the dirty log: %w", os.NewSyscallError("memfd_create", err))
	}
	pg := uint64(os.Getpagesize())
	mapSize := (size + pg - 1) / pg * pg
	fail := func(err error) (*dirtyLog, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("vhostuser: creating the dirty log: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(mapSize)); err != nil {
		return fail(os.NewSyscallError("ftruncate", err))
	}
	// Sealed, so neither process can shrink it under the other's mapping.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		return fail(os.NewSyscallError("fcntl", err))
	}
	m, err := arena.NewFromFD(fd, 0, int64(mapSize))
	if err != nil {
		return fail(err)
	}
	return &dirtyLog{m: m, size: size, fd: fd}, nil
}

// mapLog maps the log l in fd, as a back end does on SET_LOG_BASE. The fd
// must hold the whole log.
func mapLog(fd int, l LogArea) (*dirtyLog, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("vhostuser: SET_LOG_BASE: %w", os.NewSyscallError("fstat", err))
	}
	if st.Size < 0 || uint64(st.Size) < l.Offset+l.Size {
		return nil, malformed(SetLogBase, "log [%#x, +%#x) past the end of its fd (%#x bytes)", l.Offset, l.Size, st.Size)
	}
	pg := uint64(os.Getpagesize())
	start := l.Offset &^ (pg - 1)
	n := (l.Offset - start + l.Size + pg - 1) / pg * pg
	m, err := arena.NewFromFD(fd, int64(start), int64(n))
	if err != nil {
		return nil, fmt.Errorf("vhostuser: SET_LOG_BASE: mapping the log: %w", err)
	}
	return &dirtyLog{m: m, off: int64(l.Offset - start), size: l.Size, fd: -1}, nil
}

// area returns the log as SET_LOG_BASE describes it.
func (d *dirtyLog) area() LogArea { return LogArea{Size: d.size, Offset: uint64(d.off)} }

// covers reports whether the log has a bit for every page below end.
func (d *dirtyLog) covers(end uint64) bool { return LogSize(end) <= d.size }

func (d *dirtyLog) wordOff(w uint64) int64 { return d.off + int64(w*8) }

// or sets the bits of mask (native order) in word w.
func (d *dirtyLog) or(w, mask uint64) error {
	for {
		old, err := d.m.LoadUint64(d.wordOff(w))
		if err != nil || old&mask == mask {
			return err
		}
		if ok, err := d.m.CompareAndSwapUint64(d.wordOff(w), old, old|mask); ok || err != nil {
			return err
		}
	}
}

// clear clears the bits of mask (native order) in word w and returns those
// that were set.
func (d *dirtyLog) clear(w, mask uint64) uint64 {
	for {
		old, err := d.m.LoadUint64(d.wordOff(w))
		if err != nil || old&mask == 0 {
			return 0
		}
		if ok, err := d.m.CompareAndSwapUint64(d.wordOff(w), old, old&^mask); ok {
			return old & mask
		} else if err != nil {
			return 0
		}
	}
}

// wordMask is the mask (log order) of pages [lo, hi) within word w.
func wordMask(w, lo, hi uint64) uint64 {
	first, last := max(lo, w*64), min(hi, w*64+64) // pages [first, last) of the word
	n := last - first
	if n == 64 {
		return ^uint64(0)
	}
	return (uint64(1)<<n - 1) << (first - w*64)
}

// mark sets the bits of the pages holding [gpa, gpa+n).
func (d *dirtyLog) mark(gpa, n uint64) error {
	if n == 0 {
		return nil
	}
	if gpa+n < gpa {
		return fmt.Errorf("vhostuser: marking [%#x, +%#x) dirty: the range wraps around: %w", gpa, n, ErrNoLog)
	}
	lo, hi := gpa/LogPage, (gpa+n-1)/LogPage+1
	if hi > d.size*8 {
		return fmt.Errorf("vhostuser: marking [%#x, +%#x) dirty: the log covers guest addresses below %#x: %w", gpa, n,
			d.size*8*LogPage, ErrNoLog)
	}
	for w := lo / 64; w <= (hi-1)/64; w++ {
		if err := d.or(w, native(wordMask(w, lo, hi))); err != nil {
			return fmt.Errorf("vhostuser: marking [%#x, +%#x) dirty: %w", gpa, n, err)
		}
	}
	return nil
}

// take ORs into out the bits of the pages of [gpa, gpa+size) (bit b of
// out[i] is page i*64+b counted from gpa) and clears them in the log. Pages
// past the log's end are not reported (the front end sizes the log to
// cover every region).
func (d *dirtyLog) take(gpa, size uint64, out []uint64) {
	lo := gpa / LogPage
	hi := min(lo+size/LogPage, d.size*8, lo+uint64(len(out))*64)
	if lo >= hi {
		return
	}
	for w := lo / 64; w <= (hi-1)/64; w++ {
		got := native(d.clear(w, native(wordMask(w, lo, hi))))
		if got == 0 {
			continue
		}
		rel := int64(w*64) - int64(lo) // region page of the word's bit 0
		if rel < 0 {
			out[0] |= got >> uint64(-rel)
			continue
		}
		i, s := rel/64, uint64(rel%64)
		out[i] |= got << s
		if s != 0 && int(i)+1 < len(out) {
			out[i+1] |= got >> (64 - s)
		}
	}
}

// moveInto moves every set bit of d into to, which covers at least as much.
func (d *dirtyLog) moveInto(to *dirtyLog) error {
	var errs []error
	for w := uint64(0); w < d.size/8; w++ {
		if v := d.clear(w, ^uint64(0)); v != 0 {
			errs = append(errs, to.or(w, v))
		}
	}
	return errors.Join(errs...)
}

// close unmaps the log and closes its memfd if this process made it.
func (d *dirtyLog) close() error {
	err := d.m.Close()
	if d.fd >= 0 {
		err = errors.Join(err, os.NewSyscallError("close", unix.Close(d.fd)))
		d.fd = -1
	}
	return err
}
