package guestmem_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
)

// ticker stands in for a guest: it increments one word in each page of a
// working set, round after round, through guestmem (so HostWritesOnly
// tracking sees it), until paused.
type ticker struct {
	m       *guestmem.Memory
	pages   []guestmem.GuestAddress
	pause   chan chan struct{}
	resume  chan struct{}
	stopped chan struct{}
	paused  atomic.Int32 // times paused
	resumed atomic.Int32
	err     atomic.Pointer[error]
}

func startTicker(t *testing.T, m *guestmem.Memory, pages []guestmem.GuestAddress) *ticker {
	k := &ticker{m: m, pages: pages, pause: make(chan chan struct{}), resume: make(chan struct{}),
		stopped: make(chan struct{})}
	go k.run()
	t.Cleanup(k.stop)
	return k
}

func (k *ticker) run() {
	defer close(k.stopped)
	for {
		for _, a := range k.pages {
			select {
			case ack, ok := <-k.pause:
				if !ok {
					return
				}
				close(ack)
				if _, ok := <-k.resume; !ok {
					return
				}
			default:
			}
			v, err := k.m.ReadUint64(a)
			if err == nil {
				err = k.m.WriteUint64(a, v+1)
			}
			if err != nil {
				k.err.Store(&err)
				<-k.pause // wait to be stopped
				return
			}
		}
		time.Sleep(50 * time.Microsecond)
	}
}

func (k *ticker) Pause(ctx context.Context) error {
	ack := make(chan struct{})
	select {
	case k.pause <- ack:
	case <-ctx.Done():
		return ctx.Err()
	}
	<-ack
	k.paused.Add(1)
	return nil
}

func (k *ticker) Resume() error {
	k.resume <- struct{}{}
	k.resumed.Add(1)
	return nil
}

func (k *ticker) stop() {
	select {
	case <-k.stopped:
		return
	default:
	}
	close(k.pause)
	close(k.resume)
	<-k.stopped
}

// tcpPairs returns n connected TCP pairs over loopback.
func tcpPairs(t *testing.T, n int) (send, recv []io.ReadWriter) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	for range n {
		c, err := net.Dial("tcp", l.Addr().String())
		require.NoError(t, err)
		s, err := l.Accept()
		require.NoError(t, err)
		t.Cleanup(func() { c.Close(); s.Close() })
		send, recv = append(send, c), append(recv, s)
	}
	return send, recv
}

const migSize = 64 * mib

// migSource is a 64 MiB guest (two regions) with data in every other
// MiB, tracked with HostWritesOnly, and a working set of 512 pages.
func migSource(t *testing.T) (*guestmem.Memory, []guestmem.GuestAddress) {
	t.Helper()
	m := newMemory(t, guestmem.Layout{{GPA: 0, Size: 32 * mib}, {GPA: 64 * mib, Size: 32 * mib}})
	chunk := bytes.Repeat([]byte("migrate!"), mib/8)
	for _, r := range m.Regions() {
		for off := uint64(0); off < r.Size; off += 2 * mib {
			_, err := m.WriteAt(chunk, int64(r.GPA)+int64(off))
			require.NoError(t, err)
		}
	}
	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	var pages []guestmem.GuestAddress
	for i := range 512 {
		pages = append(pages, guestmem.GuestAddress(uint64(i)*61*4096%(32*mib)))
	}
	return m, pages
}

type received struct {
	m   *guestmem.Memory
	rs  guestmem.ReceiveStats
	err error
}

func receive(t *testing.T, conns []io.ReadWriter, opts ...guestmem.Option) chan received {
	ch := make(chan received, 1)
	go func() {
		m, rs, err := guestmem.ReceiveMigration(context.Background(), conns, opts...)
		if m != nil {
			t.Cleanup(func() { m.Close() })
		}
		ch <- received{m, rs, err}
	}()
	return ch
}

func TestMigratePreCopy(t *testing.T) {
	for _, tc := range []struct {
		name     string
		conns    int
		compress bool
	}{{"one connection", 1, false}, {"three connections", 3, false}, {"compressed", 2, true}} {
		t.Run(tc.name, func(t *testing.T) {
			src, pages := migSource(t)
			k := startTicker(t, src, pages)
			send, recv := tcpPairs(t, tc.conns)
			got := receive(t, recv, guestmem.WithMemfd())
			var rounds []guestmem.RoundStats
			st, err := src.Migrate(context.Background(), send, guestmem.MigrateOptions{
				// A generous target, and stop-and-copy at the limit: this test
				// is about what arrives, and the machine may be busy.
				Pause: k.Pause, Resume: k.Resume, Compress: tc.compress, MaxDowntime: 500 * time.Millisecond,
				MaxRounds: 10, OnLimit: guestmem.StopAndCopy,
				Progress: func(rs guestmem.RoundStats) { rounds = append(rounds, rs) },
			})
			require.NoError(t, err)
			r := <-got
			require.NoError(t, r.err)
			require.Equal(t, int32(1), k.paused.Load(), "paused once, for the last round")
			require.Zero(t, k.resumed.Load(), "and left paused")
			// At switchover the destination equals the source at the pause.
			require.True(t, bytes.Equal(image(t, src), image(t, r.m)), "destination memory = source memory")
			require.Equal(t, src.Regions()[1].GPA, r.m.Regions()[1].GPA)
			require.Equal(t, guestmem.Memfd, r.m.Backing())
			require.GreaterOrEqual(t, st.Populated, uint64(32*mib), "the first pass sent the populated half")
			require.LessOrEqual(t, st.Populated, uint64(32*mib+len(pages)*4096), "and the pages the ticker touched")
			for _, rs := range rounds {
				t.Logf("round %d: %d pages, %d bytes in %v (%.0f MB/s of guest memory), dirty %d → est. %v", rs.Round,
					rs.Pages, rs.Bytes, rs.Duration, rs.Throughput/1e6, rs.DirtyBytes, rs.Downtime)
			}
			require.GreaterOrEqual(t, st.Rounds, 1)
			require.True(t, rounds[len(rounds)-1].Paused)
			require.Equal(t, st.Rounds+1, len(rounds), "a report per round: the first pass, then each round")
			require.Positive(t, st.Downtime)
			t.Logf("%d rounds, %d bytes for %d populated, downtime %v, total %v", st.Rounds, st.Bytes, st.Populated,
				st.Downtime, st.Total)
			// The guest continues on the destination with its counters.
			before := make([]uint64, len(pages))
			for i, a := range pages {
				before[i], err = r.m.ReadUint64(a)
				require.NoError(t, err)
			}
			k2 := startTicker(t, r.m, pages)
			time.Sleep(20 * time.Millisecond)
			require.NoError(t, k2.Pause(context.Background()))
			for i, a := range pages[:10] {
				v, err := r.m.ReadUint64(a)
				require.NoError(t, err)
				require.Greater(t, v, before[i], "the counters go on from where the source stopped")
			}
		})
	}
}

// baseSave takes a full Save of m, the base the dirty state is relative to.
func baseSave(t *testing.T, m *guestmem.Memory) []byte {
	t.Helper()
	var b bytes.Buffer
	_, err := m.Save(context.Background(), &b, guestmem.SaveOptions{})
	require.NoError(t, err)
	return b.Bytes()
}

// requireIntact checks that the dirty state of m (paused) is complete: an
// increment on base restores to exactly what m holds now.
func requireIntact(t *testing.T, m *guestmem.Memory, base []byte) {
	t.Helper()
	var inc bytes.Buffer
	_, err := m.Save(context.Background(), &inc, guestmem.SaveOptions{Incremental: true})
	require.NoError(t, err, "an increment is still possible")
	r, err := guestmem.Restore(context.Background(), []io.Reader{bytes.NewReader(base), &inc})
	require.NoError(t, err)
	defer r.Close()
	require.True(t, bytes.Equal(image(t, m), image(t, r)),
		"dirty state intact: base + increment = the memory, every page written since the base is in it")
}

// A migration that cannot converge gives up without pausing, or, asked to,
// stops and copies; either way the source's dirty state is intact.
func TestMigrateConvergencePolicy(t *testing.T) {
	for _, policy := range []guestmem.LimitPolicy{guestmem.GiveUp, guestmem.StopAndCopy} {
		t.Run([]string{"give up", "stop and copy"}[policy], func(t *testing.T) {
			src, pages := migSource(t)
			base := baseSave(t, src)
			for _, a := range pages[:7] {
				require.NoError(t, src.WriteUint64(a+8, 0x77))
			}
			k := startTicker(t, src, pages)
			send, recv := tcpPairs(t, 1)
			// A slow link (50 MB/s): every round lasts long enough for the
			// ticker to dirty its pages again.
			send[0] = &slowConn{Conn: send[0].(net.Conn), rate: 50e6}
			got := receive(t, recv)
			st, err := src.Migrate(context.Background(), send, guestmem.MigrateOptions{
				Pause: k.Pause, Resume: k.Resume, MaxDowntime: time.Nanosecond, MaxRounds: 2, OnLimit: policy,
				Progress: func(rs guestmem.RoundStats) {
					t.Logf("round %d: %d pages in %v, dirty %d → est. %v", rs.Round, rs.Pages, rs.Duration,
						rs.DirtyBytes, rs.Downtime)
				}})
			if policy == guestmem.GiveUp {
				require.ErrorIs(t, err, guestmem.ErrNoConvergence)
				require.Zero(t, k.paused.Load(), "never paused")
				send[0].(*slowConn).Close()
				r := <-got
				require.Error(t, r.err, "the receiver fails and frees what it built")
				require.Nil(t, r.m)
			} else {
				require.NoError(t, err)
				require.False(t, st.Converged)
				r := <-got
				require.NoError(t, r.err)
				require.True(t, bytes.Equal(image(t, src), image(t, r.m)))
			}
			if policy == guestmem.GiveUp {
				require.NoError(t, k.Pause(context.Background())) // stop writing (Migrate left it paused otherwise)
			}
			requireIntact(t, src, base)
		})
	}
}

// cutConn fails every write after n bytes, closing the connection, as a
// link cut or a dead receiver would.
type cutConn struct {
	net.Conn
	left atomic.Int64
}

func (c *cutConn) Write(p []byte) (int, error) {
	if c.left.Add(-int64(len(p))) < 0 {
		c.Conn.Close()
		return 0, errors.New("link cut")
	}
	return c.Conn.Write(p)
}

// A connection cut at any point fails the migration on both sides; the
// source keeps running (resumed if it had been paused) with its memory and
// dirty state intact, and can be migrated again.
func TestMigrateCutConnection(t *testing.T) {
	for _, phase := range []string{"hello", "first pass", "round", "paused round", "receiver dies"} {
		t.Run(phase, func(t *testing.T) {
			src, pages := migSource(t)
			base := baseSave(t, src)
			require.NoError(t, src.WriteUint64(3*mib, 0x33))
			k := startTicker(t, src, pages)
			send, recv := tcpPairs(t, 1)
			cut := &cutConn{Conn: send[0].(net.Conn)}
			cut.left.Store(1 << 40)
			o := guestmem.MigrateOptions{Pause: k.Pause, Resume: k.Resume, MaxDowntime: 200 * time.Millisecond,
				IOTimeout: 2 * time.Second, OnLimit: guestmem.StopAndCopy}
			switch phase {
			case "hello":
				cut.left.Store(10)
			case "first pass":
				cut.left.Store(8 << 20)
			case "round":
				o.MaxDowntime = time.Nanosecond // never converges: rounds go on until the cut
				o.Progress = func(rs guestmem.RoundStats) {
					if rs.Round == 1 {
						cut.left.Store(64 << 10)
					}
				}
			case "paused round":
				o.Pause = func(ctx context.Context) error {
					cut.left.Store(1000)
					return k.Pause(ctx)
				}
			case "receiver dies":
				recv[0] = &dyingConn{Conn: recv[0].(net.Conn), left: 12 << 20}
			}
			got := receive(t, recv)
			_, err := src.Migrate(context.Background(), []io.ReadWriter{cut}, o)
			require.Error(t, err)
			t.Logf("%s: %v", phase, err)
			require.Equal(t, k.paused.Load(), k.resumed.Load(), "resumed if paused")
			if phase == "paused round" {
				require.Equal(t, int32(1), k.resumed.Load())
			}
			cut.Close()
			r := <-got
			require.Error(t, r.err)
			require.Nil(t, r.m, "the receiver freed what it built")
			if e := k.err.Load(); e != nil {
				t.Fatalf("the guest could not run: %v", *e)
			}
			require.NoError(t, k.Pause(context.Background()))
			requireIntact(t, src, base)
			require.NoError(t, k.Resume())

			// And it migrates afterwards.
			send, recv = tcpPairs(t, 1)
			got = receive(t, recv)
			_, err = src.Migrate(context.Background(), send, guestmem.MigrateOptions{Pause: k.Pause, Resume: k.Resume, OnLimit: guestmem.StopAndCopy})
			require.NoError(t, err)
			r = <-got
			require.NoError(t, r.err)
			require.True(t, bytes.Equal(image(t, src), image(t, r.m)))
		})
	}
}

// dyingConn is a receiver's connection that dies after reading left bytes.
type dyingConn struct {
	net.Conn
	left int64
}

func (c *dyingConn) Read(p []byte) (int, error) {
	if c.left <= 0 {
		c.Conn.Close()
		return 0, errors.New("receiver killed")
	}
	n, err := c.Conn.Read(p[:min(int64(len(p)), c.left)])
	c.left -= int64(n)
	return n, err
}

// A receiver that finds a bad checksum says so, and the sender reports it.
func TestMigrateReceiverError(t *testing.T) {
	src, pages := migSource(t)
	k := startTicker(t, src, pages)
	send, recv := tcpPairs(t, 1)
	flip := &flipConn{Conn: recv[0].(net.Conn), at: 2 << 20}
	got := receive(t, []io.ReadWriter{flip})
	_, err := src.Migrate(context.Background(), send, guestmem.MigrateOptions{Pause: k.Pause, Resume: k.Resume, OnLimit: guestmem.StopAndCopy})
	require.ErrorIs(t, err, guestmem.ErrMigrationProtocol)
	require.ErrorContains(t, err, "checksum")
	r := <-got
	require.ErrorIs(t, r.err, guestmem.ErrSnapshotChecksum)
}

// flipConn flips one byte of what it reads.
type flipConn struct {
	net.Conn
	mu  sync.Mutex
	off int64
	at  int64
}

func (c *flipConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	if c.off <= c.at && c.at < c.off+int64(n) {
		p[c.at-c.off] ^= 0x40
	}
	c.off += int64(n)
	c.mu.Unlock()
	return n, err
}

func TestMigrateCancelAndBadInput(t *testing.T) {
	src, pages := migSource(t)
	k := startTicker(t, src, pages)
	_, err := src.Migrate(context.Background(), nil, guestmem.MigrateOptions{Pause: k.Pause, Resume: k.Resume, OnLimit: guestmem.StopAndCopy})
	require.ErrorIs(t, err, guestmem.ErrBadOption)
	send, _ := tcpPairs(t, 1)
	_, err = src.Migrate(context.Background(), send, guestmem.MigrateOptions{})
	require.ErrorIs(t, err, guestmem.ErrBadOption, "Pause and Resume are required")

	// A receiver that never answers, and a cancelled context.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = src.Migrate(ctx, send, guestmem.MigrateOptions{Pause: k.Pause, Resume: k.Resume, OnLimit: guestmem.StopAndCopy})
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Zero(t, k.paused.Load())

	// Hotplug waits for the migration to end.
	send, recv := tcpPairs(t, 1)
	got := receive(t, recv)
	var hotErr error
	_, err = src.Migrate(context.Background(), send, guestmem.MigrateOptions{Pause: func(ctx context.Context) error {
		_, hotErr = src.AddRegion(guestmem.RegionSpec{GPA: 128 * mib, Size: 2 * mib})
		return k.Pause(ctx)
	}, Resume: k.Resume, OnLimit: guestmem.StopAndCopy})
	require.NoError(t, err)
	require.ErrorIs(t, hotErr, guestmem.ErrMigrating)
	require.NoError(t, (<-got).err)

	// Garbage is not a migration.
	a, b := net.Pipe()
	go func() { a.Write(bytes.Repeat([]byte{1}, 64)); a.Close() }()
	_, _, err = guestmem.ReceiveMigration(context.Background(), []io.ReadWriter{b})
	require.ErrorIs(t, err, guestmem.ErrMigrationProtocol)
}

// slowConn writes at rate bytes per second.
type slowConn struct {
	net.Conn
	rate float64
}

func (c *slowConn) Write(p []byte) (int, error) {
	time.Sleep(time.Duration(float64(len(p)) / c.rate * float64(time.Second)))
	return c.Conn.Write(p)
}

// Post-copy: the destination takes over at once after the first pass, and
// the guest runs there while the last dirty pages arrive, fetched on touch
// or pushed.
func TestMigratePostCopy(t *testing.T) {
	src, pages := migSource(t)
	k := startTicker(t, src, pages)
	send, recv := tcpPairs(t, 2)
	got := receive(t, recv)
	st, err := src.Migrate(context.Background(), send, guestmem.MigrateOptions{Pause: k.Pause, Resume: k.Resume,
		PostCopy: true})
	require.NoError(t, err)
	r := <-got
	require.NoError(t, r.err)
	require.NotNil(t, r.rs.PostCopy, "the receiver switched to post-copy")
	require.Zero(t, k.resumed.Load())
	require.NotZero(t, st.PostCopyBytes, "the last dirty pages came after the switchover")
	require.NoError(t, r.rs.PostCopy.Wait(context.Background()))
	require.True(t, bytes.Equal(image(t, src), image(t, r.m)), "every page arrived")

	// Again, with the destination's guest running while the pages stream in.
	src2, pages2 := migSource(t)
	k2 := startTicker(t, src2, pages2)
	send, recv = tcpPairs(t, 1)
	got = receive(t, recv)
	var dst *guestmem.Memory
	var od *guestmem.OnDemand
	var before []uint64
	done := make(chan error, 1)
	go func() {
		_, err := src2.Migrate(context.Background(), send, guestmem.MigrateOptions{Pause: k2.Pause, Resume: k2.Resume,
			PostCopy: true})
		done <- err
	}()
	r = <-got
	require.NoError(t, r.err)
	dst, od = r.m, r.rs.PostCopy
	require.NotNil(t, od)
	k3 := startTicker(t, dst, pages2) // reads fetch each page from the source as needed
	require.NoError(t, <-done)
	require.NoError(t, od.Wait(context.Background()))
	require.NoError(t, k3.Pause(context.Background()))
	p := od.Progress()
	t.Logf("post-copy: %d units, %d fetched for the host, %d pushed", p.DataBytes/(256<<10), p.HostFetched, p.DataBytes)
	for _, a := range pages2 {
		v, err := src2.ReadUint64(a)
		require.NoError(t, err)
		before = append(before, v)
		w, err := dst.ReadUint64(a)
		require.NoError(t, err)
		require.GreaterOrEqual(t, w, v, "the counter at %v went on from the source's", a)
	}
	// Pages the guest does not touch are the source's.
	a, b := image(t, src2), image(t, dst)
	for _, pg := range pages2 {
		copy(a[pg:pg+8], b[pg:pg+8])
	}
	require.True(t, bytes.Equal(a, b))
	_ = before
}

// A connection lost after the switchover fails both sides: the source is
// not resumed (the state is split), and the destination fences off what did
// not arrive.
func TestMigratePostCopyLost(t *testing.T) {
	src, pages := migSource(t)
	k := startTicker(t, src, pages)
	send, recv := tcpPairs(t, 1)
	cut := &cutConn{Conn: send[0].(net.Conn)}
	cut.left.Store(1 << 40)
	got := receive(t, recv)
	_, err := src.Migrate(context.Background(), []io.ReadWriter{cut}, guestmem.MigrateOptions{
		Pause: k.Pause, Resume: k.Resume, PostCopy: true, IOTimeout: 2 * time.Second,
		Progress: func(rs guestmem.RoundStats) {
			if rs.Paused {
				cut.left.Store(300 << 10) // a unit or so after the switchover
			}
		}})
	require.ErrorIs(t, err, guestmem.ErrPostCopyLost)
	require.Zero(t, k.resumed.Load(), "the source is not resumed")
	r := <-got
	require.NoError(t, r.err, "the destination had taken over")
	werr := r.rs.PostCopy.Wait(context.Background())
	require.ErrorIs(t, werr, guestmem.ErrPostCopyLost)
	require.ErrorIs(t, werr, guestmem.ErrRestoreFailed)
	lost := 0
	for _, a := range pages {
		if _, err := r.m.ReadUint64(a); err != nil {
			require.ErrorIs(t, err, guestmem.ErrRestoreFailed)
			lost++
		}
	}
	require.NotZero(t, lost, "what did not arrive is an error, not zeros")
}
