package vhostuser

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"sync"
)

// frontendProtocol are the protocol features a Frontend asks for, each
// used if the back end offers it.
const frontendProtocol = ProtocolLogShmfd | ProtocolReplyAck | ProtocolConfigureMemSlots

// Frontend is the VMM's end of a vhost-user connection: it sends requests
// and reads their replies, one exchange at a time. It is safe for
// concurrent use. After the connection breaks (a send fails, a reply is
// malformed or never comes), every call returns that first error: the
// specification has the front end give up on a connection it cannot trust.
type Frontend struct {
	mu       sync.Mutex
	c        conn
	features uint64 // the back end's GET_FEATURES answer
	protocol uint64 // protocol features both ends use
	maxSlots uint64 // GET_MAX_MEM_SLOTS, or MaxRegions without CONFIGURE_MEM_SLOTS
	broken   error
}

// Dial connects to the back end listening on the unix socket at path and
// negotiates as NewFrontend does.
func Dial(path string) (*Frontend, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("vhostuser: connecting to the back end: %w", err)
	}
	f, err := NewFrontend(c)
	if err != nil {
		c.Close()
		return nil, err
	}
	return f, nil
}

// NewFrontend takes c, a connected unix stream socket whose other end is a
// vhost-user back end, and opens the session: SET_OWNER, GET_FEATURES, and
// when the back end offers protocol features, GET_PROTOCOL_FEATURES and
// SET_PROTOCOL_FEATURES with those of LOG_SHMFD, REPLY_ACK and
// CONFIGURE_MEM_SLOTS it has, then GET_MAX_MEM_SLOTS if CONFIGURE_MEM_SLOTS
// is among them. The virtio features (SET_FEATURES) are the device's
// business, left to the caller. The Frontend owns c from here; Close
// closes it. A back end that never answers blocks this and every exchange:
// set a deadline on c to bound them.
func NewFrontend(c *net.UnixConn) (*Frontend, error) {
	f := &Frontend{c: conn{c}, maxSlots: MaxRegions}
	if _, err := f.exchange(SetOwner, nil, nil, false); err != nil {
		return nil, err
	}
	features, err := f.get(GetFeatures)
	if err != nil {
		return nil, err
	}
	f.features = features
	if features&FeatureProtocolFeatures == 0 {
		return f, nil
	}
	offered, err := f.get(GetProtocolFeatures)
	if err != nil {
		return nil, err
	}
	want := offered & frontendProtocol
	if _, err := f.exchange(SetProtocolFeatures, u64(want), nil, false); err != nil {
		return nil, err
	}
	f.protocol = want
	if want&ProtocolConfigureMemSlots != 0 {
		n, err := f.get(GetMaxMemSlots)
		if err != nil {
			return nil, err
		}
		if n == 0 {
			return nil, fmt.Errorf("vhostuser: the back end offers 0 memory slots: %w", ErrTooManyRegions)
		}
		f.maxSlots = n
	}
	return f, nil
}

// Features returns the back end's virtio features, as GET_FEATURES answered.
func (f *Frontend) Features() uint64 { return f.features }

// ProtocolFeatures returns the protocol features both ends use.
func (f *Frontend) ProtocolFeatures() uint64 { return f.protocol }

// MaxMemSlots returns how many regions the back end takes: its
// GET_MAX_MEM_SLOTS answer with CONFIGURE_MEM_SLOTS, else MaxRegions.
func (f *Frontend) MaxMemSlots() int { return int(min(f.maxSlots, 1<<20)) }

// Close closes the connection. Later calls return an error wrapping
// fs.ErrClosed.
func (f *Frontend) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if errors.Is(f.broken, fs.ErrClosed) {
		return nil
	}
	f.broken = fmt.Errorf("vhostuser: the connection is closed: %w", fs.ErrClosed)
	return f.c.c.Close()
}

// SetFeatures sends SET_FEATURES with the virtio features the front end
// acknowledges (FeatureLogAll among them to have a back end log its writes).
func (f *Frontend) SetFeatures(features uint64) error {
	_, err := f.exchange(SetFeatures, u64(features), nil, false)
	return err
}

// SetMemTable sends SET_MEM_TABLE: the regions, with fds[i] the descriptor
// regions[i].MmapOffset is an offset in (the same fd may appear for every
// region). At most MaxRegions fit. It returns once the back end has
// processed it: with REPLY_ACK, its status says it mapped them; without, a
// GET_FEATURES round trip behind it shows it has read the table.
func (f *Frontend) SetMemTable(regions []MemoryRegion, fds []int) error {
	if len(fds) != len(regions) {
		return fmt.Errorf("vhostuser: SET_MEM_TABLE: %d fds for %d regions", len(fds), len(regions))
	}
	p, err := EncodeMemTable(regions)
	if err != nil {
		return err
	}
	if _, err := f.exchange(SetMemTable, p, fds, false); err != nil {
		return err
	}
	return f.barrier()
}

// AddMemReg sends ADD_MEM_REG: one region, in fd at r.MmapOffset. It needs
// CONFIGURE_MEM_SLOTS. It returns once the back end has processed it (with
// REPLY_ACK, its status; without, a GET_FEATURES round trip behind it).
func (f *Frontend) AddMemReg(r MemoryRegion, fd int) error {
	if err := f.needSlots(AddMemReg); err != nil {
		return err
	}
	if _, err := f.exchange(AddMemReg, EncodeMemRegion(r), []int{fd}, false); err != nil {
		return err
	}
	return f.barrier()
}

// RemMemReg sends REM_MEM_REG for r (identified by its guest address, size
// and user address). It needs CONFIGURE_MEM_SLOTS. It returns once the back
// end has processed it — with REPLY_ACK its status says it unmapped the
// region; without, a GET_FEATURES round trip behind it shows the back end
// has read it — so the front end can then release the memory.
func (f *Frontend) RemMemReg(r MemoryRegion) error {
	if err := f.needSlots(RemMemReg); err != nil {
		return err
	}
	if _, err := f.exchange(RemMemReg, EncodeMemRegion(r), nil, false); err != nil {
		return err
	}
	return f.barrier()
}

// SetLogBase sends SET_LOG_BASE: the shared dirty log in fd at l.Offset.
// It needs LOG_SHMFD; the back end's reply says it has mapped the log.
func (f *Frontend) SetLogBase(l LogArea, fd int) error {
	if f.protocol&ProtocolLogShmfd == 0 {
		return fmt.Errorf("vhostuser: SET_LOG_BASE: the back end does not offer LOG_SHMFD: %w", errors.ErrUnsupported)
	}
	reply, err := f.exchange(SetLogBase, l.Encode(), []int{fd}, true)
	if err != nil {
		return err
	}
	// libvhost-user and DPDK answer with a u64; an empty reply is fine too.
	if len(reply) != 0 && len(reply) != 8 {
		return f.breakWith(malformed(SetLogBase, "reply of %d bytes, want 0 or 8", len(reply)))
	}
	return nil
}

// Call sends req with payload and fds and returns the back end's reply
// payload, for the requests this package does not wrap. With wantReply the
// request is one the specification answers (GET_*); otherwise, with
// REPLY_ACK, the call waits for the back end's status and returns nil.
func (f *Frontend) Call(req Request, payload []byte, fds []int, wantReply bool) ([]byte, error) {
	return f.exchange(req, payload, fds, wantReply)
}

func (f *Frontend) needSlots(req Request) error {
	if f.protocol&ProtocolConfigureMemSlots == 0 {
		return fmt.Errorf("vhostuser: %v: the back end does not offer CONFIGURE_MEM_SLOTS: %w", req, errors.ErrUnsupported)
	}
	return nil
}

// barrier waits until the back end has processed everything sent so far:
// with REPLY_ACK every exchange did already; without, a GET_FEATURES reply
// comes only after the requests before it.
func (f *Frontend) barrier() error {
	if f.protocol&ProtocolReplyAck != 0 {
		return nil
	}
	_, err := f.get(GetFeatures)
	return err
}

func (f *Frontend) get(req Request) (uint64, error) {
	reply, err := f.exchange(req, nil, nil, true)
	if err != nil {
		return 0, err
	}
	v, err := decodeU64(req, reply)
	if err != nil {
		return 0, f.breakWith(err)
	}
	return v, nil
}

// breakWith records err as the connection's end and returns it.
func (f *Frontend) breakWith(err error) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.broken == nil {
		f.broken = err
	}
	return err
}

// exchange sends one request and reads its reply: the request's own reply
// when wantReply, else a REPLY_ACK status when that was negotiated.
func (f *Frontend) exchange(req Request, payload []byte, fds []int, wantReply bool) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.broken != nil {
		return nil, f.broken
	}
	ack := !wantReply && f.protocol&ProtocolReplyAck != 0
	h := Header{Request: req, Flags: Version}
	if ack {
		h.Flags |= FlagNeedReply
	}
	if err := f.c.send(Message{Header: h, Payload: payload, FDs: fds}); err != nil {
		f.broken = err
		return nil, err
	}
	if !wantReply && !ack {
		return nil, nil
	}
	reply, err := f.c.recv()
	if err != nil {
		f.broken = fmt.Errorf("vhostuser: waiting for the reply to %v: %w", req, noEOF(err))
		return nil, f.broken
	}
	if len(reply.FDs) > 0 {
		reply.closeFDs()
		f.broken = malformed(req, "the reply carries file descriptors")
		return nil, f.broken
	}
	if reply.Request != req || reply.Flags&FlagReply == 0 {
		f.broken = malformed(req, "the reply is %v with flags %#x, want %v with the reply flag", reply.Request,
			reply.Flags, req)
		return nil, f.broken
	}
	if !ack {
		return reply.Payload, nil
	}
	status, err := decodeU64(req, reply.Payload)
	if err != nil {
		f.broken = err
		return nil, err
	}
	if status != 0 {
		return nil, &RejectedError{Request: req, Status: status}
	}
	return nil, nil
}
