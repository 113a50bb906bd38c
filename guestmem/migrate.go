package guestmem

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Live migration, pre-copy (docs/migration.md): the sender streams guest
// memory over one or more connections while the guest runs — a first pass
// of the populated pages, then rounds of the pages dirtied meanwhile — and,
// once what is left would be sent within the downtime target, pauses the
// guest and sends the rest. Every round is a snapshot part of the usual
// format (docs/guestmem.md), so every page arrives checksummed.

// ErrMigrating is returned by AddRegion, RemoveRegion and a second Migrate
// while a migration is sending the memory.
var ErrMigrating = errors.New("migration in progress")

// ErrNoConvergence is returned by Migrate when the round or time limit is
// reached with more dirty memory left than the downtime target allows, and
// the policy is GiveUp: the guest was never paused.
var ErrNoConvergence = errors.New("migration did not converge")

// ErrMigrationProtocol is wrapped by errors about what the other side sent:
// a bad hello, an unknown version, a bad frame, or the peer's own error.
var ErrMigrationProtocol = errors.New("migration protocol error")

// MigrationVersion is the version of the migration protocol.
const MigrationVersion = 1

// LimitPolicy says what Migrate does when it reaches MaxRounds or
// MaxDuration without converging.
type LimitPolicy int

const (
	// GiveUp ends the migration with ErrNoConvergence, the guest never
	// paused (the default).
	GiveUp LimitPolicy = iota
	// StopAndCopy pauses the guest anyway and sends what is left, however
	// long that takes.
	StopAndCopy
)

// MigrateOptions tunes Migrate.
type MigrateOptions struct {
	// Pause stops the vCPUs (kvm.VM.Pause) for the final round; Resume
	// restarts them if the migration fails after Pause. Both are required.
	Pause  func(context.Context) error
	Resume func() error
	// MaxDowntime is the target for the final, paused round: Migrate pauses
	// once the dirty memory left would be sent within it at the bandwidth
	// the last round measured (default 100 ms). Within target, it first
	// runs more rounds while each would at least halve the estimate (the
	// guest dirties less than half the bandwidth) and the estimate is above
	// an eighth of the target.
	MaxDowntime time.Duration
	// MaxRounds bounds the rounds after the first pass (default 30), and
	// MaxDuration, if set, the time before the pause; OnLimit says what
	// happens then.
	MaxRounds   int
	MaxDuration time.Duration
	OnLimit     LimitPolicy
	// Compress sends the data zstd-compressed (snapshot format version 2).
	Compress bool
	// HostWritesOnly starts dirty tracking, if it is off, with
	// HostWritesOnly: for memory no vCPU writes unregistered. Otherwise the
	// memory must be registered with its VM (dirty tracking needs KVM's
	// log).
	HostWritesOnly bool
	// IOTimeout bounds each read and write on a connection that has
	// deadlines (a net.Conn): a peer or link that stops answering for that
	// long fails the migration (default 10 s).
	IOTimeout time.Duration
	// Progress, if set, is called after every round.
	Progress func(RoundStats)
	// PostCopy switches over early: after PostCopyAfter rounds (0: right
	// after the first pass), or sooner if the rounds converge or reach a
	// limit, the guest is paused and, instead of its last dirty pages, the
	// list of them is sent; the destination runs the guest at once and
	// fetches them on fault while the rest is pushed (docs/migration.md).
	// A connection lost after the switchover is ErrPostCopyLost, and the
	// source is then not resumed: the guest's state is split.
	PostCopy      bool
	PostCopyAfter int
}

// RoundStats describes one round of a migration.
type RoundStats struct {
	Round     int           // 0: the first pass; the last: the paused round
	Paused    bool          // the guest was paused for it
	Pages     uint64        // 4 KiB pages sent (data and zero records)
	DataBytes uint64        // guest bytes sent as data
	Bytes     int64         // bytes on the connections
	Duration  time.Duration // until the receiver acknowledged the round
	Bandwidth float64       // bytes per second on the connections
	// Throughput is guest bytes (data and zero pages) per second: what the
	// downtime estimate divides by, as compression makes it exceed
	// Bandwidth.
	Throughput float64
	// DirtyRate is the guest's dirtying during the round, bytes per
	// second; DirtyBytes what it dirtied, the next round's size; and
	// Downtime the estimated time to send it (what convergence is judged
	// on).
	DirtyRate  float64
	DirtyBytes uint64
	Downtime   time.Duration
}

// MigrateStats describes a finished migration.
type MigrateStats struct {
	Rounds    int           // rounds after the first pass, the paused one included
	Converged bool          // the downtime target was met (not StopAndCopy at a limit)
	Total     time.Duration // from the call to the receiver's last acknowledgement
	Downtime  time.Duration // from Pause to the receiver's last acknowledgement
	Bytes     int64         // bytes sent on all connections
	DataBytes uint64        // guest bytes sent as data, over all rounds
	Populated uint64        // guest bytes the first pass sent: what a Save would
	// PostCopyBytes is what post-copy pushed after the switchover (PostCopy);
	// Downtime is then the time from Pause to the destination's taking over.
	PostCopyBytes uint64
}

// stripeSize is the unit in which guest memory is shared among the
// connections: stripe k goes on connection k mod n.
const stripeSize = 2 << 20

// Protocol frames (docs/migration.md).
const (
	helloMagic = "GMEMMIG\x00"
	ackMagic   = "GMEMACK\x00"
	finMagic   = "GMEMFIN\x00"
	helloSize  = 64
	ackSize    = 32
	ackOK      = 0
	ackError   = 1
	finRound   = 0xffffffff // the round number of the acknowledgement of FIN
	maxAckText = 4096
)

type hello struct {
	id      [16]byte
	streams uint32
	index   uint32
	stripe  uint64
}

func (h hello) marshal() []byte {
	b := make([]byte, helloSize)
	le := binary.LittleEndian
	copy(b, helloMagic)
	le.PutUint32(b[8:], MigrationVersion)
	le.PutUint32(b[12:], h.streams)
	le.PutUint32(b[16:], h.index)
	le.PutUint64(b[24:], h.stripe)
	copy(b[32:], h.id[:])
	le.PutUint32(b[60:], blockCRC(b, 60))
	return b
}

func readHello(r io.Reader) (hello, error) {
	b := make([]byte, helloSize)
	if _, err := io.ReadFull(r, b); err != nil {
		return hello{}, fmt.Errorf("reading the hello: %w", err)
	}
	le := binary.LittleEndian
	switch {
	case string(b[:8]) != helloMagic:
		return hello{}, fmt.Errorf("%w: not a migration stream", ErrMigrationProtocol)
	case le.Uint32(b[8:]) != MigrationVersion:
		return hello{}, fmt.Errorf("%w: version %d, this side speaks %d", ErrMigrationProtocol, le.Uint32(b[8:]),
			MigrationVersion)
	case blockCRC(b, 60) != le.Uint32(b[60:]):
		return hello{}, fmt.Errorf("%w: hello checksum", ErrMigrationProtocol)
	}
	h := hello{streams: le.Uint32(b[12:]), index: le.Uint32(b[16:]), stripe: le.Uint64(b[24:])}
	copy(h.id[:], b[32:48])
	if h.streams == 0 || h.streams > 256 || h.index >= h.streams || h.stripe != stripeSize {
		return hello{}, fmt.Errorf("%w: hello for stream %d of %d, stripe %#x", ErrMigrationProtocol, h.index,
			h.streams, h.stripe)
	}
	return h, nil
}

// ack frames: magic, round u32, status u32, text length u32, crc u32 of
// the frame and the text, then the text (an error message).
func ackFrame(round uint32, err error) []byte {
	if err != nil {
		text := []byte(err.Error())
		return frame(round, ackError, text[:min(len(text), maxAckText)])
	}
	return frame(round, ackOK, nil)
}

func frame(round, status uint32, text []byte) []byte {
	b := make([]byte, ackSize, ackSize+len(text))
	le := binary.LittleEndian
	copy(b, ackMagic)
	le.PutUint32(b[8:], round)
	le.PutUint32(b[12:], status)
	le.PutUint32(b[16:], uint32(len(text)))
	b = append(b, text...)
	le.PutUint32(b[20:], blockCRC(b, 20))
	return b
}

// readAck reads an acknowledgement and returns its round and status (ok,
// or a post-copy request).
func readAck(r io.Reader) (uint32, uint32, error) {
	b := make([]byte, ackSize)
	if _, err := io.ReadFull(r, b); err != nil {
		return 0, 0, fmt.Errorf("waiting for the receiver: %w", err)
	}
	le := binary.LittleEndian
	n := le.Uint32(b[16:])
	if string(b[:8]) != ackMagic || n > maxAckText {
		return 0, 0, fmt.Errorf("%w: bad acknowledgement", ErrMigrationProtocol)
	}
	b = append(b, make([]byte, n)...)
	if _, err := io.ReadFull(r, b[ackSize:]); err != nil {
		return 0, 0, fmt.Errorf("waiting for the receiver: %w", err)
	}
	if blockCRC(b, 20) != le.Uint32(b[20:]) {
		return 0, 0, fmt.Errorf("%w: acknowledgement checksum", ErrMigrationProtocol)
	}
	switch st := le.Uint32(b[12:]); st {
	case ackOK, ackRequest:
		return le.Uint32(b[8:]), st, nil
	}
	return 0, 0, fmt.Errorf("%w: the receiver failed: %s", ErrMigrationProtocol, b[ackSize:])
}

// finBlock ends a stream: the parts it carried.
func finBlock(parts uint32) []byte {
	b := make([]byte, blockSize)
	copy(b, finMagic)
	binary.LittleEndian.PutUint32(b[8:], parts)
	binary.LittleEndian.PutUint32(b[12:], blockCRC(b, 12))
	return b
}

// deadlineConn refreshes a deadline before every read and write, so a
// stalled peer fails the call after the timeout however long the whole
// transfer takes.
type deadlineConn struct {
	rw      io.ReadWriter
	timeout time.Duration
	aborted atomic.Bool // the receiver failed: writes stop at once
}

type deadliner interface {
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

func (c *deadlineConn) Read(p []byte) (int, error) {
	if d, ok := c.rw.(deadliner); ok {
		_ = d.SetReadDeadline(time.Now().Add(c.timeout))
	}
	return c.rw.Read(p)
}

func (c *deadlineConn) Write(p []byte) (int, error) {
	if c.aborted.Load() {
		return 0, errAborted
	}
	if d, ok := c.rw.(deadliner); ok {
		_ = d.SetWriteDeadline(time.Now().Add(c.timeout))
	}
	return c.rw.Write(p)
}

var errAborted = errors.New("the receiver ended the stream")

// abort makes writes fail now, also one blocked on a full connection.
func (c *deadlineConn) abort() {
	c.aborted.Store(true)
	if d, ok := c.rw.(deadliner); ok {
		_ = d.SetWriteDeadline(time.Unix(1, 0))
	}
}

// unblockOnDone makes blocked I/O on the connections return once ctx is
// done (connections with deadlines); the returned function undoes it.
func unblockOnDone(ctx context.Context, conns []io.ReadWriter) func() bool {
	return context.AfterFunc(ctx, func() {
		for _, c := range conns {
			if d, ok := c.(deadliner); ok {
				past := time.Unix(1, 0)
				_ = d.SetReadDeadline(past)
				_ = d.SetWriteDeadline(past)
			}
		}
	})
}

// stream is the sender's side of one connection. A goroutine reads the
// receiver's acknowledgements as they come, so an error it reports stops
// the writes at once, rather than after a timeout.
type stream struct {
	rw       *deadlineConn
	w        *bufio.Writer
	acks     chan ackResult
	requests chan int      // post-copy: units the receiver asks for
	done     chan struct{} // the reader has stopped
	index    int
	lastID   [16]byte
	parts    uint32
	bytes    int64
}

type ackResult struct {
	round uint32
	err   error
}

// readAcks reads acknowledgements until the last one (FIN's) or an error.
func (s *stream) readAcks() {
	defer close(s.done)
	for {
		// The raw connection: no deadline while the sender is still
		// writing, which can take long on a slow link (ack bounds the wait).
		round, status, err := readAck(s.rw.rw)
		if err == nil && status == ackRequest {
			s.requests <- int(round)
			continue
		}
		s.acks <- ackResult{round, err}
		if err != nil {
			s.rw.abort()
			return
		}
		if round == finRound {
			return
		}
	}
}

// ack waits for the acknowledgement of round want, everything having been
// written, for at most the I/O timeout.
func (s *stream) ack(want uint32) error {
	var a ackResult
	select {
	case a = <-s.acks:
	case <-time.After(s.rw.timeout):
		s.rw.abort()
		return fmt.Errorf("waiting for the receiver: no acknowledgement of round %d within %v", want, s.rw.timeout)
	}
	if a.err == nil && a.round != want {
		a.err = fmt.Errorf("%w: acknowledgement of round %d, expected %d", ErrMigrationProtocol, a.round, want)
	}
	if a.err != nil {
		s.acks <- a // it stays the stream's answer
	}
	return a.err
}

// failed returns the receiver's error, if it sent one, in place of the
// write error it caused.
func (s *stream) failed(werr error) error {
	select {
	case a := <-s.acks:
		s.acks <- a
		if a.err != nil {
			return a.err
		}
	default:
	}
	return werr
}

// stop ends the acknowledgement reader (unblocking its read on a
// connection with deadlines) and clears the deadlines Migrate set.
func (s *stream) stop() {
	d, ok := s.rw.rw.(deadliner)
	if ok {
		_ = d.SetReadDeadline(time.Unix(1, 0))
	}
	if ok {
		<-s.done
		_ = d.SetReadDeadline(time.Time{})
		_ = d.SetWriteDeadline(time.Time{})
	}
}

// stripesOf returns the parts of spans in the stripes of stream i of n.
func stripesOf(spans []Span, n, i int) []Span {
	var out []Span
	for _, s := range spans {
		for pos, end := s.GPA, s.GPA+GuestAddress(s.Size); pos < end; {
			next := min(end, GuestAddress((uint64(pos)/stripeSize+1)*stripeSize))
			if int(uint64(pos)/stripeSize%uint64(n)) == i {
				if k := len(out); k > 0 && out[k-1].End() == pos {
					out[k-1].Size += uint64(next - pos)
				} else {
					out = append(out, Span{GPA: pos, Size: uint64(next - pos)})
				}
			}
			pos = next
		}
	}
	return out
}

// Migrate sends guest memory to a receiver (ReceiveMigration) over conns,
// one or more connections used in parallel, while the guest runs, and
// returns once the receiver holds a verified copy of it as it was at the
// pause. The guest is then left paused: the caller stops it for good (or,
// to call the migration off, resumes it). See docs/migration.md.
//
// On any failure — a connection cut, the receiver's error, ctx cancelled,
// no convergence under GiveUp — the source is untouched: if Migrate had
// paused the guest it resumes it (o.Resume), and dirty tracking is as it
// was, the pages dirtied since the last Save all still dirty, so the next
// incremental Save, or another Migrate, is complete. Migrate never closes
// conns.
func (m *Memory) Migrate(ctx context.Context, conns []io.ReadWriter, o MigrateOptions) (st MigrateStats, err error) {
	const op = "Migrate"
	start := time.Now()
	if len(conns) == 0 || len(conns) > 256 {
		return st, fmt.Errorf("guestmem: %s: %w: %d connections (1 to 256)", op, ErrBadOption, len(conns))
	}
	if o.Pause == nil || o.Resume == nil {
		return st, fmt.Errorf("guestmem: %s: %w: Pause and Resume are required", op, ErrBadOption)
	}
	if o.MaxDowntime <= 0 {
		o.MaxDowntime = 100 * time.Millisecond
	}
	if o.MaxRounds <= 0 {
		o.MaxRounds = 30
	}
	if o.IOTimeout <= 0 {
		o.IOTimeout = 10 * time.Second
	}
	if !m.migrating.CompareAndSwap(false, true) {
		return st, fmt.Errorf("guestmem: %s: %w", op, ErrMigrating)
	}
	defer m.migrating.Store(false)

	// Dirty tracking: what was dirty before stays dirty after (every set
	// collected here is put back at the end).
	started := false
	if !m.Tracking() {
		var topts []TrackingOption
		if o.HostWritesOnly {
			topts = append(topts, HostWritesOnly())
		}
		if err := m.StartDirtyTracking(topts...); err != nil {
			return st, withOp(op, err)
		}
		started = true
	}
	var collected []*DirtySet
	collect := func() (*DirtySet, error) {
		d, err := m.CollectDirty()
		if err == nil {
			collected = append(collected, d)
		}
		return d, err
	}
	paused, switched := false, false
	defer func() {
		if err != nil && paused && !switched {
			err = errors.Join(err, o.Resume())
		}
		if started {
			err = errors.Join(err, m.StopDirtyTracking())
		} else if t, aerr := m.acquire(op); aerr == nil {
			for _, d := range collected {
				t.remark(d)
			}
			t.release()
		}
		if err != nil {
			err = withOp(op, err)
		}
	}()
	if _, err := collect(); err != nil { // the dirty state before: put back at the end
		return st, err
	}

	stop := unblockOnDone(ctx, conns)
	defer stop()
	var id [16]byte
	if _, err := rand.Read(id[:]); err != nil {
		return st, err
	}
	streams := make([]*stream, len(conns))
	for i, c := range conns {
		dc := &deadlineConn{rw: c, timeout: o.IOTimeout}
		streams[i] = &stream{rw: dc, w: bufio.NewWriterSize(dc, 1<<20), index: i, acks: make(chan ackResult, 4),
			requests: make(chan int, 1024), done: make(chan struct{})}
		go streams[i].readAcks()
		defer streams[i].stop()
		h := hello{id: id, streams: uint32(len(conns)), index: uint32(i), stripe: stripeSize}
		if _, err := streams[i].w.Write(h.marshal()); err != nil {
			return st, err
		}
	}
	if err := parallel(streams, func(s *stream) error {
		if err := s.w.Flush(); err != nil {
			return s.failed(err)
		}
		return s.ack(0)
	}); err != nil {
		return st, ctxFirst(ctx, err)
	}

	// The first pass: populated memory; then rounds of dirty pages.
	round := func(n int, dirty *DirtySet) (RoundStats, error) {
		rs := RoundStats{Round: n, Paused: paused}
		t0 := time.Now()
		var mu sync.Mutex
		err := m.sendRound(ctx, streams, o.Compress, dirty, func(sw *snapWriter) {
			mu.Lock()
			rs.Pages += (sw.stats.DataBytes + sw.stats.ZeroBytes) / dirtyPage
			rs.DataBytes += sw.stats.DataBytes
			rs.Bytes += sw.stats.Bytes
			mu.Unlock()
		})
		rs.Duration = time.Since(t0)
		if s := rs.Duration.Seconds(); s > 0 {
			rs.Bandwidth = float64(rs.Bytes) / s
			rs.Throughput = float64(rs.Pages*dirtyPage) / s
		}
		st.Bytes += rs.Bytes
		st.DataBytes += rs.DataBytes
		return rs, ctxFirst(ctx, err)
	}
	rs, err := round(0, nil)
	if err != nil {
		return st, err
	}
	st.Populated = rs.DataBytes
	lastCollect := time.Now()
	for n := 1; ; n++ {
		d, err := collect()
		if err != nil {
			return st, err
		}
		rs.DirtyBytes = d.Bytes()
		if s := time.Since(lastCollect).Seconds(); s > 0 {
			rs.DirtyRate = float64(d.Bytes()) / max(s, rs.Duration.Seconds())
		}
		lastCollect = time.Now()
		bw := max(rs.Throughput, 1)
		rs.Downtime = time.Duration(float64(d.Bytes()) / bw * float64(time.Second))
		if o.Progress != nil {
			o.Progress(rs)
		}
		within := rs.Downtime <= o.MaxDowntime
		limit := n > o.MaxRounds || o.MaxDuration > 0 && time.Since(start) > o.MaxDuration
		// Within target, one more round may still shrink the pause; at a
		// limit, within target is enough.
		converged := within && (limit || !worthAnotherRound(rs, o.MaxDowntime))
		if o.PostCopy && (converged || limit || n > o.PostCopyAfter) {
			st.Converged = converged
			return m.switchOver(ctx, streams, o, &st, d, n, start, collect, &paused, &switched)
		}
		if !converged && limit && o.OnLimit == GiveUp {
			return st, fmt.Errorf("%w after %d rounds in %v: %d dirty bytes left would take %v at %.0f MB/s, the target is %v",
				ErrNoConvergence, n-1, time.Since(start).Round(time.Millisecond), d.Bytes(), rs.Downtime,
				rs.Bandwidth/1e6, o.MaxDowntime)
		}
		if converged || limit {
			// Stop and copy.
			st.Converged = converged
			pauseAt := time.Now()
			if err := o.Pause(ctx); err != nil {
				return st, fmt.Errorf("pausing the guest: %w", err)
			}
			paused = true
			last, err := collect()
			if err != nil {
				return st, err
			}
			last.merge(d)
			rs, err = round(n, last)
			if err != nil {
				return st, err
			}
			if err := parallel(streams, func(s *stream) error {
				if _, err := s.w.Write(finBlock(s.parts)); err != nil {
					return s.failed(err)
				}
				if err := s.w.Flush(); err != nil {
					return s.failed(err)
				}
				return s.ack(finRound)
			}); err != nil {
				return st, ctxFirst(ctx, err)
			}
			st.Downtime = time.Since(pauseAt)
			rs.Duration = st.Downtime
			if o.Progress != nil {
				o.Progress(rs)
			}
			st.Rounds = n
			st.Total = time.Since(start)
			return st, nil
		}
		if rs, err = round(n, d); err != nil {
			return st, err
		}
	}
}

// worthAnotherRound reports whether one more round while the guest runs
// should come before the pause, though the estimated downtime is already
// within target: the guest dirties less than half of what the link carries
// (so the round would at least halve what the pause has to send) and the
// estimate is still above an eighth of the target. It costs one estimate's
// worth of total time, and the downtime shrinks by the same factor.
func worthAnotherRound(rs RoundStats, target time.Duration) bool {
	if rs.Downtime <= target/8 || rs.Throughput <= 0 {
		return false
	}
	return rs.DirtyRate < rs.Throughput/2
}

// switchOver pauses the guest and switches to post-copy: the last dirty
// set goes as a list of units on stream 0 (the others end), and the units'
// data is then pushed there, requested ones first. It returns once the
// receiver has every unit.
func (m *Memory) switchOver(ctx context.Context, streams []*stream, o MigrateOptions, st *MigrateStats, d *DirtySet,
	n int, start time.Time, collect func() (*DirtySet, error), paused, switched *bool) (MigrateStats, error) {
	pauseAt := time.Now()
	if err := o.Pause(ctx); err != nil {
		return *st, fmt.Errorf("pausing the guest: %w", err)
	}
	*paused = true
	last, err := collect()
	if err != nil {
		return *st, err
	}
	last.merge(d)
	t, err := m.acquire("Migrate")
	if err != nil {
		return *st, err
	}
	units := postCopyUnits(t.regions, last, max(fillUnit, m.pageSize))
	t.release()
	if err := parallel(streams[1:], func(s *stream) error {
		if _, err := s.w.Write(finBlock(s.parts)); err != nil {
			return s.failed(err)
		}
		if err := s.w.Flush(); err != nil {
			return s.failed(err)
		}
		return s.ack(finRound)
	}); err != nil {
		return *st, ctxFirst(ctx, err)
	}
	s := streams[0]
	if _, err := s.w.Write(pcopyBlock(units)); err != nil {
		return *st, s.failed(err)
	}
	if err := s.w.Flush(); err != nil {
		return *st, s.failed(err)
	}
	if err := s.ack(s.parts); err != nil { // the destination runs the guest from here
		return *st, ctxFirst(ctx, err)
	}
	*switched = true
	st.Downtime = time.Since(pauseAt)
	if o.Progress != nil {
		o.Progress(RoundStats{Round: n, Paused: true, Pages: last.Pages(), Duration: st.Downtime})
	}
	bytes, err := m.sendPostCopy(ctx, s, units)
	st.Bytes += bytes
	if err != nil {
		return *st, fmt.Errorf("%w: %w", ErrPostCopyLost, ctxFirst(ctx, err))
	}
	st.Rounds = n
	st.PostCopyBytes = uint64(bytes)
	st.Total = time.Since(start)
	return *st, nil
}

// ctxFirst prefers ctx's error to the I/O error its cancellation caused.
func ctxFirst(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	return err
}

// parallel runs fn on every stream at once and returns the first error.
func parallel(streams []*stream, fn func(*stream) error) error {
	errs := make([]error, len(streams))
	var wg sync.WaitGroup
	for i, s := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = fn(s)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// merge adds o's pages to d.
func (d *DirtySet) merge(o *DirtySet) {
	all := slices.Concat(d.spans, o.spans)
	slices.SortFunc(all, func(a, b Span) int { return cmpAddr(a.GPA, b.GPA) })
	var out []Span
	var pages uint64
	for _, s := range all {
		// Overlapping spans merge; touching ones stay apart, since they
		// may lie in two regions.
		if k := len(out); k > 0 && out[k-1].End() > s.GPA {
			if s.End() > out[k-1].End() {
				out[k-1].Size = uint64(s.End() - out[k-1].GPA)
			}
			continue
		}
		out = append(out, s)
	}
	for _, s := range out {
		pages += s.Size / dirtyPage
	}
	d.spans, d.pages = out, pages
}

// sendRound sends one round on every stream: a full snapshot part of the
// populated memory (dirty nil) or an increment of the dirty pages, each
// stream its stripes, then waits for every acknowledgement. done sees each
// stream's writer after its part is written.
func (m *Memory) sendRound(ctx context.Context, streams []*stream, compress bool, dirty *DirtySet,
	done func(*snapWriter)) error {
	t, err := m.acquire("Migrate")
	if err != nil {
		return err
	}
	defer t.release()
	var layout Layout
	for _, r := range t.regions {
		layout = append(layout, RegionSpec{GPA: r.GPA, Size: r.Size, ReadOnly: r.ReadOnly})
	}
	var spans []Span
	if dirty == nil {
		for _, r := range t.regions {
			ext, err := m.populated(r)
			if err != nil {
				return err
			}
			for _, e := range ext {
				spans = append(spans, Span{GPA: r.GPA + GuestAddress(e.off), Size: uint64(e.n)})
			}
		}
	} else {
		spans = dirty.spans
	}
	return parallel(streams, func(s *stream) error {
		// The connection's Write runs holding t: what would wait for the
		// table (Close, hotplug) fails with ErrReentered instead.
		m.inCallback.Enter("Migrate")
		defer m.inCallback.Leave()
		h := snapHeader{regions: layout}
		if compress {
			h.version = SnapshotVersionCompressed
		}
		if _, err := rand.Read(h.id[:]); err != nil {
			return err
		}
		if dirty != nil {
			h.flags, h.base = flagIncrement, s.lastID
		}
		sw := &snapWriter{w: s.w, m: m, t: t, ctx: ctx, live: true, compress: compress}
		err := sw.write(h.marshal())
		for _, sp := range stripesOf(spans, len(streams), s.index) {
			if err != nil {
				break
			}
			err = sw.scan(sp.GPA, sp.Size, dirty != nil)
		}
		if err == nil {
			err = sw.flush()
		}
		if err == nil {
			err = sw.end()
		}
		if err == nil {
			err = s.w.Flush()
		}
		if err != nil {
			return s.failed(err)
		}
		s.bytes += sw.stats.Bytes
		done(sw)
		s.lastID = h.id
		round := s.parts
		s.parts++
		return s.ack(round)
	})
}

// ReceiveStats describes what ReceiveMigration received.
type ReceiveStats struct {
	Parts     int    // snapshot parts applied, over all connections
	DataBytes uint64 // guest bytes received as data
	// PostCopy is set when the sender switched to post-copy: the memory is
	// then returned before all of it is here, served by userfaultfd while
	// the sender pushes the rest (PostCopy.Wait says when it is all in; a
	// connection lost meanwhile fails it with ErrPostCopyLost, and the
	// pages that did not arrive are fenced off, never read as zeros).
	PostCopy *OnDemand
}

// ReceiveMigration is the receiving side of Migrate: it reads the streams
// on conns (the connections the sender's Migrate writes, in any order),
// builds new guest memory from the first pass and applies every round as
// it arrives, acknowledging each, and returns the memory once every stream
// has ended — every page checked against its checksum. opts choose the
// backing as for Restore. On any failure it frees everything, tells the
// sender (an error acknowledgement) where it can, and returns the error.
// It never closes conns.
func ReceiveMigration(ctx context.Context, conns []io.ReadWriter, opts ...Option) (mem *Memory, rs ReceiveStats,
	err error) {
	const op = "ReceiveMigration"
	if len(conns) == 0 {
		return nil, rs, fmt.Errorf("guestmem: %s: %w: no connection", op, ErrBadOption)
	}
	c := newConfig(opts)
	if err := c.check(op); err != nil {
		return nil, rs, err
	}
	stop := unblockOnDone(ctx, conns)
	defer stop()
	type in struct {
		rw io.ReadWriter
		r  *bufio.Reader
		h  hello
	}
	ins := make([]*in, len(conns))
	for i, cn := range conns {
		ins[i] = &in{rw: cn, r: bufio.NewReaderSize(cn, 1<<20)}
	}
	var mu sync.Mutex // guards mem, rs
	defer func() {
		if err != nil {
			for _, x := range ins {
				_, _ = x.rw.Write(ackFrame(0, err)) // best effort: the sender learns why
			}
			if mem != nil {
				err = errors.Join(err, mem.Close())
				mem = nil
			}
			err = withOp(op, ctxFirst(ctx, err))
		}
	}()
	errs := make([]error, len(ins))
	var wg sync.WaitGroup
	for i, x := range ins {
		wg.Add(1)
		go func() {
			defer wg.Done()
			x.h, errs[i] = readHello(x.r)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, rs, err
	}
	seen := make([]bool, len(ins))
	for _, x := range ins {
		if x.h.id != ins[0].h.id || int(x.h.streams) != len(ins) || seen[x.h.index] {
			return nil, rs, fmt.Errorf("%w: the connections are not the %d streams of one migration", ErrMigrationProtocol,
				len(ins))
		}
		seen[x.h.index] = true
	}
	for _, x := range ins {
		if _, err := x.rw.Write(ackFrame(0, nil)); err != nil {
			return nil, rs, err
		}
	}
	// The memory comes from the first header to arrive; every stream must
	// carry the same layout.
	var layout Layout
	memory := func(sr *snapReader) (*Memory, error) {
		mu.Lock()
		defer mu.Unlock()
		if mem == nil {
			m, err := newMemory(sr.info.Layout, c)
			if err != nil {
				return nil, err
			}
			mem, layout = m, sr.info.Layout
		} else if !slices.Equal(layout, sr.info.Layout) {
			return nil, sr.fail(sr.start, fmt.Errorf("%w: stream %d's layout differs", ErrSnapshotLayout, sr.stream))
		}
		return mem, nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for i, x := range ins {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = receiveStream(ctx, x.r, x.rw, int(x.h.index), memory, func(data uint64) {
				mu.Lock()
				rs.Parts++
				rs.DataBytes += data
				mu.Unlock()
			})
			if errs[i] != nil {
				cancel() // the others stop too
			}
		}()
	}
	wg.Wait()
	var sw *switchover
	if errors.As(errs[0], &sw) {
		errs[0] = nil
	}
	if err := errors.Join(errs...); err != nil {
		return nil, rs, err
	}
	if sw != nil {
		var x *in
		for _, y := range ins {
			if y.h.index == 0 {
				x = y
			}
		}
		if mem == nil {
			return nil, rs, fmt.Errorf("%w: a post-copy switchover before any memory", ErrMigrationProtocol)
		}
		if mem.gmem != nil {
			// Refused before the switchover is acknowledged: the sender
			// resumes its guest.
			return nil, rs, fmt.Errorf("%w: the sender switched to post-copy, which serves pages by userfaultfd, "+
				"and userfaultfd cannot register guest_memfd mappings; migrate without PostCopy", ErrGuestMemfdLimit)
		}
		od, err := startPostCopy(mem, sw.units, x.r, x.rw, sw.parts, nil)
		if err != nil {
			return nil, rs, err
		}
		rs.PostCopy = od
	}
	return mem, rs, nil
}

// switchover is how receiveStream reports that stream 0 switched to
// post-copy.
type switchover struct {
	units []Span
	parts uint32
}

func (*switchover) Error() string { return "post-copy switchover" }

// receiveStream applies the parts of one stream until its FIN block.
func receiveStream(ctx context.Context, r *bufio.Reader, w io.Writer, index int,
	memory func(*snapReader) (*Memory, error), applied func(uint64)) error {
	sr := &snapReader{r: r, stream: index}
	var prev *SnapshotInfo
	parts := uint32(0)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		magic, err := r.Peek(8)
		if err != nil {
			return fmt.Errorf("stream %d: %w", index, err)
		}
		if string(magic) == pcopyMagic {
			if index != 0 {
				return fmt.Errorf("%w: a post-copy switchover on stream %d", ErrMigrationProtocol, index)
			}
			units, err := readPcopy(r)
			if err != nil {
				return err
			}
			return &switchover{units: units, parts: parts}
		}
		if string(magic) == finMagic {
			b := make([]byte, blockSize)
			if _, err := io.ReadFull(r, b); err != nil {
				return err
			}
			le := binary.LittleEndian
			if blockCRC(b, 12) != le.Uint32(b[12:]) || le.Uint32(b[8:]) != parts {
				return fmt.Errorf("%w: stream %d ends with a bad FIN block (%d parts sent, %d received)",
					ErrMigrationProtocol, index, le.Uint32(b[8:]), parts)
			}
			_, err := w.Write(ackFrame(finRound, nil))
			return err
		}
		more, err := sr.nextPart(MaxGuestAddress)
		if err != nil {
			return err
		}
		if !more {
			return fmt.Errorf("stream %d: %w: it ended without a FIN block", index, ErrSnapshotTruncated)
		}
		if err := chainCheck(sr.index, prev, sr); err != nil {
			return err
		}
		m, err := memory(sr)
		if err != nil {
			return err
		}
		if err := m.apply(ctx, sr); err != nil {
			return err
		}
		info := sr.info
		prev = &info
		applied(info.DataBytes)
		if _, err := w.Write(ackFrame(parts, nil)); err != nil {
			return err
		}
		parts++
	}
}
