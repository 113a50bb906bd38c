package vhostuser

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
)

// MemoryMap is a back end's view of guest memory: the regions the front
// end sent, each mapped shared from its fd at its offset, addressed by
// guest-physical address, and the dirty log if one was sent. Accesses are
// bounds-checked, and a memory fault (a region past the end of a file
// that shrank) is an error, not a crash. It is safe for concurrent use:
// device goroutines may access it while the Backend applies ADD_MEM_REG and
// REM_MEM_REG, which wait for accesses in flight.
type MemoryMap struct {
	mu      sync.RWMutex
	regions []mapped // sorted by guest address
	log     *dirtyLog
	closed  bool
}

type mapped struct {
	MemoryRegion
	m *arena.Mapping
}

// Regions returns the mapped regions, lowest guest address first.
func (mm *MemoryMap) Regions() []MemoryRegion {
	mm.mu.RLock()
	defer mm.mu.RUnlock()
	out := make([]MemoryRegion, len(mm.regions))
	for i, r := range mm.regions {
		out[i] = r.MemoryRegion
	}
	return out
}

// find returns the region holding gpa. The caller holds mm.mu.
func (mm *MemoryMap) find(gpa uint64) (mapped, bool) {
	i, _ := slices.BinarySearchFunc(mm.regions, gpa, func(r mapped, a uint64) int {
		if r.End() <= a {
			return -1
		}
		if r.GuestPhysAddr > a {
			return 1
		}
		return 0
	})
	if i < len(mm.regions) && mm.regions[i].GuestPhysAddr <= gpa && gpa < mm.regions[i].End() {
		return mm.regions[i], true
	}
	return mapped{}, false
}

// each calls fn for the pieces of [gpa, gpa+n), one per region, checking
// first that every byte is mapped (regions must be contiguous to be
// crossed). The caller holds mm.mu.
func (mm *MemoryMap) each(op string, gpa, n uint64, fn func(r mapped, off int64, lo, hi uint64) error) error {
	if mm.closed {
		return fmt.Errorf("vhostuser: %s: the memory map is closed: %w", op, fs.ErrClosed)
	}
	if gpa+n < gpa {
		return fmt.Errorf("vhostuser: %s [%#x, +%#x): the range wraps around: %w", op, gpa, n, ErrNoRegion)
	}
	for pass := 0; pass < 2; pass++ {
		for a, done := gpa, uint64(0); done < n; {
			r, ok := mm.find(a)
			if !ok {
				return fmt.Errorf("vhostuser: %s [%#x, +%#x): guest address %#x is in no region: %w", op, gpa, n, a,
					ErrNoRegion)
			}
			k := min(n-done, r.End()-a)
			if pass == 1 {
				if err := fn(r, int64(a-r.GuestPhysAddr), done, done+k); err != nil {
					return fmt.Errorf("vhostuser: %s [%#x, +%#x): %w", op, gpa, n, err)
				}
			}
			a, done = a+k, done+k
		}
	}
	return nil
}

// ReadAt reads len(p) bytes at guest-physical address gpa (io.ReaderAt).
// Nothing is read unless the whole range is mapped.
func (mm *MemoryMap) ReadAt(p []byte, gpa int64) (int, error) {
	mm.mu.RLock()
	defer mm.mu.RUnlock()
	n := 0
	err := mm.each("ReadAt", uint64(gpa), uint64(len(p)), func(r mapped, off int64, lo, hi uint64) error {
		k, err := r.m.ReadAt(p[lo:hi], off)
		n += k
		return err
	})
	return n, err
}

// WriteAt writes p at guest-physical address gpa (io.WriterAt) and, when
// the front end gave a dirty log, marks the pages written in it. Nothing
// is written unless the whole range is mapped.
func (mm *MemoryMap) WriteAt(p []byte, gpa int64) (int, error) {
	mm.mu.RLock()
	defer mm.mu.RUnlock()
	n := 0
	err := mm.each("WriteAt", uint64(gpa), uint64(len(p)), func(r mapped, off int64, lo, hi uint64) error {
		k, err := r.m.WriteAt(p[lo:hi], off)
		n += k
		return err
	})
	if n > 0 && mm.log != nil {
		err = errors.Join(err, mm.log.mark(uint64(gpa), uint64(n)))
	}
	return n, err
}

// Translate returns the address in this process of guest-physical address
// gpa, for a range of n bytes that must lie in one region. It stays valid
// until the region is removed (REM_MEM_REG, a new SET_MEM_TABLE) or the map
// closed; accesses through it are not fault-protected, and writes through
// it are not logged: call MarkDirty.
func (mm *MemoryMap) Translate(gpa, n uint64) (uintptr, error) {
	mm.mu.RLock()
	defer mm.mu.RUnlock()
	if mm.closed {
		return 0, fmt.Errorf("vhostuser: Translate: the memory map is closed: %w", fs.ErrClosed)
	}
	r, ok := mm.find(gpa)
	if !ok || n > r.End()-gpa {
		return 0, fmt.Errorf("vhostuser: Translate [%#x, +%#x): not within one region: %w", gpa, n, ErrNoRegion)
	}
	return r.m.Addr() + uintptr(gpa-r.GuestPhysAddr), nil
}

// Bytes returns guest memory [gpa, gpa+n) itself, which must lie in one
// region, with Translate's validity and caveats.
func (mm *MemoryMap) Bytes(gpa, n uint64) ([]byte, error) {
	mm.mu.RLock()
	defer mm.mu.RUnlock()
	var b []byte
	err := mm.each("Bytes", gpa, n, func(r mapped, off int64, lo, hi uint64) error {
		if lo != 0 || hi != n {
			return fmt.Errorf("the range crosses a region boundary: %w", ErrNoRegion)
		}
		var err error
		b, err = r.m.Bytes(off, int64(n))
		return err
	})
	return b, err
}

// MarkDirty sets the dirty-log bits of the pages holding [gpa, gpa+n),
// atomically, for writes made through Translate or Bytes. It is ErrNoLog
// before the front end sent a log, or past its end.
func (mm *MemoryMap) MarkDirty(gpa, n uint64) error {
	mm.mu.RLock()
	defer mm.mu.RUnlock()
	if mm.log == nil {
		return fmt.Errorf("vhostuser: MarkDirty: the front end sent no log (SET_LOG_BASE): %w", ErrNoLog)
	}
	return mm.log.mark(gpa, n)
}

// Logging reports whether the front end sent a dirty log.
func (mm *MemoryMap) Logging() bool {
	mm.mu.RLock()
	defer mm.mu.RUnlock()
	return mm.log != nil
}

// Close unmaps every region and the log. Later accesses return an error
// wrapping fs.ErrClosed; Close is idempotent.
func (mm *MemoryMap) Close() error {
	mm.mu.Lock()
	defer mm.mu.Unlock()
	if mm.closed {
		return nil
	}
	mm.closed = true
	var errs []error
	for _, r := range mm.regions {
		errs = append(errs, r.m.Close())
	}
	mm.regions = nil
	if mm.log != nil {
		errs = append(errs, mm.log.close())
		mm.log = nil
	}
	return errors.Join(errs...)
}

// mapRegion maps r from fd, which must hold all of it.
func mapRegion(req Request, r MemoryRegion, fd int) (mapped, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return mapped{}, fmt.Errorf("vhostuser: %v: %w", req, os.NewSyscallError("fstat", err))
	}
	if st.Size < 0 || uint64(st.Size) < r.MmapOffset+r.MemorySize {
		return mapped{}, malformed(req, "region at guest address %#x: [%#x, +%#x) is past the end of its fd (%#x bytes)",
			r.GuestPhysAddr, r.MmapOffset, r.MemorySize, st.Size)
	}
	m, err := arena.NewFromFD(fd, int64(r.MmapOffset), int64(r.MemorySize))
	if err != nil {
		return mapped{}, fmt.Errorf("vhostuser: %v: mapping the region at guest address %#x: %w", req, r.GuestPhysAddr, err)
	}
	return mapped{MemoryRegion: r, m: m}, nil
}

// setTable replaces the table with regions, mapped from fds: all are
// mapped before the old ones go, so a failure leaves the old table.
func (mm *MemoryMap) setTable(regions []MemoryRegion, fds []int) error {
	table := make([]mapped, 0, len(regions))
	for i, r := range regions {
		mr, err := mapRegion(SetMemTable, r, fds[i])
		if err != nil {
			for _, t := range table {
				t.m.Close()
			}
			return err
		}
		table = append(table, mr)
	}
	slices.SortFunc(table, func(a, b mapped) int { return cmpAddr(a.GuestPhysAddr, b.GuestPhysAddr) })
	mm.mu.Lock()
	old := table // a closed map keeps nothing
	if !mm.closed {
		old, mm.regions = mm.regions, table
	}
	mm.mu.Unlock()
	var errs []error
	for _, r := range old {
		errs = append(errs, r.m.Close())
	}
	return errors.Join(errs...)
}

// add maps r from fd and adds it; at most max regions, none overlapping.
func (mm *MemoryMap) add(r MemoryRegion, fd int, max int) error {
	mm.mu.RLock()
	n := len(mm.regions)
	for _, o := range mm.regions {
		if o.overlaps(r) {
			mm.mu.RUnlock()
			return malformed(AddMemReg, "region [%#x, %#x) overlaps the mapped region [%#x, %#x)", r.GuestPhysAddr,
				r.End(), o.GuestPhysAddr, o.End())
		}
	}
	mm.mu.RUnlock()
	if n >= max {
		return fmt.Errorf("vhostuser: ADD_MEM_REG: %d regions mapped, the most offered: %w", n, ErrTooManyRegions)
	}
	mr, err := mapRegion(AddMemReg, r, fd)
	if err != nil {
		return err
	}
	mm.mu.Lock()
	defer mm.mu.Unlock()
	if mm.closed {
		mr.m.Close()
		return fmt.Errorf("vhostuser: ADD_MEM_REG: the memory map is closed: %w", fs.ErrClosed)
	}
	mm.regions = append(mm.regions, mr)
	slices.SortFunc(mm.regions, func(a, b mapped) int { return cmpAddr(a.GuestPhysAddr, b.GuestPhysAddr) })
	return nil
}

// remove unmaps the region with r's guest address, size and user address.
func (mm *MemoryMap) remove(r MemoryRegion) error {
	mm.mu.Lock()
	i := slices.IndexFunc(mm.regions, func(o mapped) bool {
		return o.GuestPhysAddr == r.GuestPhysAddr && o.MemorySize == r.MemorySize && o.UserspaceAddr == r.UserspaceAddr
	})
	if i < 0 {
		mm.mu.Unlock()
		return fmt.Errorf("vhostuser: REM_MEM_REG [%#x, +%#x) at user address %#x: %w", r.GuestPhysAddr, r.MemorySize,
			r.UserspaceAddr, ErrNoRegion)
	}
	gone := mm.regions[i]
	mm.regions = slices.Delete(mm.regions, i, i+1)
	mm.mu.Unlock()
	return gone.m.Close()
}

// setLog maps the log l in fd, replacing any earlier one.
func (mm *MemoryMap) setLog(fd int, l LogArea) error {
	d, err := mapLog(fd, l)
	if err != nil {
		return err
	}
	mm.mu.Lock()
	old := mm.log
	mm.log = d
	if mm.closed {
		old, mm.log = d, nil
	}
	mm.mu.Unlock()
	if old != nil {
		return old.close()
	}
	return nil
}

func cmpAddr(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// BackendConfig is what a Backend offers the front end.
type BackendConfig struct {
	// Features are the virtio features answered to GET_FEATURES;
	// FeatureProtocolFeatures is always added.
	Features uint64
	// ProtocolFeatures are the protocol features offered; zero means
	// LOG_SHMFD, REPLY_ACK and CONFIGURE_MEM_SLOTS, all this Backend knows.
	ProtocolFeatures uint64
	// MaxMemSlots answers GET_MAX_MEM_SLOTS; zero means 32.
	MaxMemSlots uint64
}

// Backend is a minimal vhost-user back end for guest memory: it answers
// the session and feature requests and applies the memory messages
// (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG, SET_LOG_BASE) to its MemoryMap.
// Any other request is an error wrapping errors.ErrUnsupported. Next and
// Serve are called from one goroutine; Memory, Features and the MemoryMap
// may be used from any.
type Backend struct {
	c        conn
	cfg      BackendConfig
	mem      MemoryMap
	features atomic.Uint64 // SET_FEATURES, read by Features from any goroutine
	protocol uint64        // SET_PROTOCOL_FEATURES
}

// NewBackend serves the front end at the other end of c, a connected unix
// stream socket, which the Backend owns from here.
func NewBackend(c *net.UnixConn, cfg BackendConfig) *Backend {
	if cfg.ProtocolFeatures == 0 {
		cfg.ProtocolFeatures = ProtocolLogShmfd | ProtocolReplyAck | ProtocolConfigureMemSlots
	}
	if cfg.MaxMemSlots == 0 {
		cfg.MaxMemSlots = 32
	}
	cfg.Features |= FeatureProtocolFeatures
	return &Backend{c: conn{c}, cfg: cfg}
}

// Memory returns the guest memory the front end has sent.
func (b *Backend) Memory() *MemoryMap { return &b.mem }

// Features returns the virtio features the front end acknowledged with
// SET_FEATURES (FeatureLogAll says it wants writes logged).
func (b *Backend) Features() uint64 { return b.features.Load() }

// Serve handles requests until the front end closes the connection, which
// returns nil, or a request fails, which returns its error.
func (b *Backend) Serve() error {
	for {
		if _, err := b.Next(); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

// Next reads and handles one request and returns it. A request that fails
// is answered with a non-zero status when the front end asked for one
// (REPLY_ACK), and its error returned; the caller should then drop the
// connection. A closed connection is io.EOF.
func (b *Backend) Next() (Request, error) {
	m, err := b.c.recv()
	if err != nil {
		return 0, err
	}
	return m.Request, b.handle(m)
}

// Close closes the connection and unmaps the guest memory.
func (b *Backend) Close() error {
	return errors.Join(b.c.c.Close(), b.mem.Close())
}

// handle applies one message and sends its reply. It closes m's fds.
func (b *Backend) handle(m Message) error {
	defer m.closeFDs()
	var reply []byte
	var err error
	if len(m.FDs) > 0 && !takesFDs(m.Request) {
		err = malformed(m.Request, "%d unexpected file descriptors", len(m.FDs))
	} else {
		reply, err = b.apply(m)
	}
	switch {
	case reply != nil && err == nil:
		return b.reply(m.Request, reply)
	case b.protocol&ProtocolReplyAck != 0 && m.Flags&FlagNeedReply != 0:
		status := uint64(0)
		if err != nil {
			status = 1
		}
		if rerr := b.reply(m.Request, u64(status)); rerr != nil {
			return errors.Join(err, rerr)
		}
	}
	return err
}

func takesFDs(r Request) bool {
	return r == SetMemTable || r == AddMemReg || r == RemMemReg || r == SetLogBase
}

func (b *Backend) reply(req Request, payload []byte) error {
	return b.c.send(Message{Header: Header{Request: req, Flags: Version | FlagReply}, Payload: payload})
}

// apply carries out m and returns the payload of its own reply, if the
// request has one.
func (b *Backend) apply(m Message) ([]byte, error) {
	noPayload := func() error {
		if len(m.Payload) != 0 {
			return malformed(m.Request, "payload of %d bytes, want none", len(m.Payload))
		}
		return nil
	}
	switch m.Request {
	case SetOwner:
		return nil, noPayload()
	case GetFeatures:
		return u64(b.cfg.Features), noPayload()
	case SetFeatures:
		v, err := decodeU64(m.Request, m.Payload)
		if err == nil {
			b.features.Store(v)
		}
		return nil, err
	case GetProtocolFeatures:
		return u64(b.cfg.ProtocolFeatures), noPayload()
	case SetProtocolFeatures:
		v, err := decodeU64(m.Request, m.Payload)
		if err != nil {
			return nil, err
		}
		if v&^b.cfg.ProtocolFeatures != 0 {
			return nil, malformed(m.Request, "protocol features %#x were not offered (%#x)", v, b.cfg.ProtocolFeatures)
		}
		b.protocol = v
		return nil, nil
	case GetMaxMemSlots:
		if err := b.need(m.Request, ProtocolConfigureMemSlots); err != nil {
			return nil, err
		}
		return u64(b.cfg.MaxMemSlots), noPayload()
	case SetMemTable:
		regions, err := DecodeMemTable(m.Payload, len(m.FDs))
		if err != nil {
			return nil, err
		}
		return nil, b.mem.setTable(regions, m.FDs)
	case AddMemReg, RemMemReg:
		if err := b.need(m.Request, ProtocolConfigureMemSlots); err != nil {
			return nil, err
		}
		r, err := DecodeMemRegion(m.Request, m.Payload, len(m.FDs))
		if err != nil {
			return nil, err
		}
		if m.Request == AddMemReg {
			return nil, b.mem.add(r, m.FDs[0], int(min(b.cfg.MaxMemSlots, 1<<20)))
		}
		return nil, b.mem.remove(r)
	case SetLogBase:
		if err := b.need(m.Request, ProtocolLogShmfd); err != nil {
			return nil, err
		}
		l, err := DecodeLogArea(m.Payload, len(m.FDs))
		if err != nil {
			return nil, err
		}
		if err := b.mem.setLog(m.FDs[0], l); err != nil {
			return nil, err
		}
		return u64(0), nil // with LOG_SHMFD the front end always waits for a reply
	}
	return nil, fmt.Errorf("vhostuser: %v: not handled by this back end: %w", m.Request, errors.ErrUnsupported)
}

// need refuses a request whose protocol feature was not negotiated.
func (b *Backend) need(req Request, feature uint64) error {
	if b.protocol&feature == 0 {
		return malformed(req, "sent without negotiating its protocol feature %#x", feature)
	}
	return nil
}
