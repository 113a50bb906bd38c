//go:build amd64

package tests

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
)

// Migration between two "hosts" as an operator has them: the receiver is a
// second process (this test binary re-executed) in a network namespace of
// its own, reached over a veth pair whose bandwidth tc's tbf limits. A
// goroutine stands in for the guest, incrementing a word in each page of a
// working set through guestmem; TestGuestMigratesBetweenNamespaces is the
// version with a real guest, on KVM.

const (
	migNetSize  = 64 * mib
	migNetConns = 2
	migNetPort  = 7441
)

// netLink is a namespace and a veth pair into it.
type netLink struct {
	ns, host, peer string
	hostIP, peerIP string
}

func run1(t testing.TB, args ...string) {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	require.NoError(t, err, "%s: %s", strings.Join(args, " "), out)
}

// newNetLink makes the namespace and the link, shaped to rate (tc tbf
// syntax, e.g. "400mbit"), and removes them when t ends.
func newNetLink(t testing.TB, rate string) *netLink {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	for _, tool := range []string{"ip", "tc"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (Debian's iproute2; .ci/run installs it)", tool)
		}
	}
	id := os.Getpid() % 100000
	l := &netLink{ns: fmt.Sprintf("gmem-mig-%d", id), host: fmt.Sprintf("gmh%d", id), peer: fmt.Sprintf("gmp%d", id),
		hostIP: "10.231.7.1", peerIP: "10.231.7.2"}
	run1(t, "ip", "netns", "add", l.ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", l.ns).Run() })
	run1(t, "ip", "link", "add", l.host, "type", "veth", "peer", "name", l.peer)
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", l.host).Run() })
	run1(t, "ip", "link", "set", l.peer, "netns", l.ns)
	run1(t, "ip", "addr", "add", l.hostIP+"/24", "dev", l.host)
	run1(t, "ip", "link", "set", l.host, "up")
	run1(t, "ip", "netns", "exec", l.ns, "ip", "addr", "add", l.peerIP+"/24", "dev", l.peer)
	run1(t, "ip", "netns", "exec", l.ns, "ip", "link", "set", l.peer, "up")
	run1(t, "ip", "netns", "exec", l.ns, "ip", "link", "set", "lo", "up")
	run1(t, "tc", "qdisc", "add", "dev", l.host, "root", "tbf", "rate", rate, "burst", "256kb", "latency", "100ms")
	return l
}

// receiver is the receiving process.
type receiver struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
	done  chan error
}

// startReceiver runs TestMigrateReceiverProcess in the namespace and waits
// until it listens.
func startReceiver(t *testing.T, l *netLink) *receiver {
	t.Helper()
	return startIn(t, l, "TestMigrateReceiverProcess",
		"GMEM_MIGRATE_RECEIVER="+net.JoinHostPort(l.peerIP, strconv.Itoa(migNetPort)))
}

// startIn runs this test binary's test named test in the namespace, with
// env added, its output read line by line and its stdin a pipe, and waits
// until it says it is listening. It is killed when t ends.
func startIn(t *testing.T, l *netLink, test string, env ...string) *receiver {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", l.ns, os.Args[0], "-test.run=^"+test+"$", "-test.v")
	cmd.Env = append(os.Environ(), env...)
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	cmd.Stderr = cmd.Stdout
	require.NoError(t, cmd.Start())
	r := &receiver{cmd: cmd, stdin: stdin, lines: make(chan string, 100), done: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			r.lines <- sc.Text()
		}
		close(r.lines)
		r.done <- cmd.Wait()
	}()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	r.expect(t, "listening")
	return r
}

// expect waits for a line of the receiver's starting with prefix and
// returns the rest.
func (r *receiver) expect(t *testing.T, prefix string) string {
	t.Helper()
	timeout := time.After(60 * time.Second)
	for {
		select {
		case line, ok := <-r.lines:
			if !ok {
				t.Fatalf("the receiver ended before %q", prefix)
			}
			t.Logf("receiver: %s", line)
			if rest, ok := strings.CutPrefix(line, prefix); ok {
				return strings.TrimSpace(rest)
			}
		case <-timeout:
			t.Fatalf("no %q from the receiver", prefix)
		}
	}
}

func dialConns(t *testing.T, l *netLink) []io.ReadWriter { return dialPort(t, l, migNetPort) }

// dialPort opens migNetConns connections to port in the namespace.
func dialPort(t *testing.T, l *netLink, port int) []io.ReadWriter {
	t.Helper()
	var conns []io.ReadWriter
	for range migNetConns {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(l.peerIP, strconv.Itoa(port)), 10*time.Second)
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		conns = append(conns, c)
	}
	return conns
}

// counter stands in for a guest: it increments the first word of each
// working-set page, over and over, until paused.
type counter struct {
	m      *guestmem.Memory
	pages  []guestmem.GuestAddress
	mu     sync.Mutex // held while paused
	paused bool
	stop   chan struct{}
	wg     sync.WaitGroup
	resume int
}

func startCounter(t *testing.T, m *guestmem.Memory, pages []guestmem.GuestAddress) *counter {
	c := &counter{m: m, pages: pages, stop: make(chan struct{})}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for {
			select {
			case <-c.stop:
				return
			default:
			}
			c.mu.Lock()
			for _, a := range c.pages {
				v, err := c.m.ReadUint64(a)
				if err == nil {
					err = c.m.WriteUint64(a, v+1)
				}
				if err != nil {
					c.mu.Unlock()
					return
				}
			}
			c.mu.Unlock()
			time.Sleep(100 * time.Microsecond)
		}
	}()
	t.Cleanup(func() {
		close(c.stop)
		if c.paused {
			c.mu.Unlock()
		}
		c.wg.Wait()
	})
	return c
}

func (c *counter) Pause(context.Context) error { c.mu.Lock(); c.paused = true; return nil }
func (c *counter) Resume() error               { c.paused = false; c.resume++; c.mu.Unlock(); return nil }

func workingSet() []guestmem.GuestAddress {
	var pages []guestmem.GuestAddress
	for i := range 1024 {
		pages = append(pages, guestmem.GuestAddress(uint64(i)*37*page%(migNetSize/2)))
	}
	return pages
}

func imageCRC(t *testing.T, m *guestmem.Memory) uint32 {
	t.Helper()
	h := crc32.NewIEEE()
	for _, r := range m.Regions() {
		_, err := m.CopyTo(h, r.GPA, r.Size)
		require.NoError(t, err)
	}
	return h.Sum32()
}

func netSource(t *testing.T) *guestmem.Memory {
	t.Helper()
	m := newMem(t, guestmem.Layout{{GPA: 0, Size: migNetSize / 2}, {GPA: 1 << 32, Size: migNetSize / 2}})
	buf := []byte(strings.Repeat("guest memory on the move ", 42)[:1024])
	for _, r := range m.Regions() {
		for off := uint64(0); off < r.Size; off += 3 * page {
			_, err := m.WriteAt(buf, int64(r.GPA)+int64(off))
			require.NoError(t, err)
		}
	}
	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	return m
}

func TestMigrateBetweenNamespaces(t *testing.T) {
	if os.Getenv("GMEM_MIGRATE_RECEIVER") != "" {
		return // the receiving process runs TestMigrateReceiverProcess only
	}
	l := newNetLink(t, "400mbit")
	src := netSource(t)
	pages := workingSet()
	c := startCounter(t, src, pages)

	t.Run("pre-copy over the shaped link", func(t *testing.T) {
		r := startReceiver(t, l)
		var rounds []guestmem.RoundStats
		st, err := src.Migrate(context.Background(), dialConns(t, l), guestmem.MigrateOptions{
			Pause: c.Pause, Resume: c.Resume, MaxDowntime: 300 * time.Millisecond, IOTimeout: 5 * time.Second,
			OnLimit:  guestmem.StopAndCopy, // the machine may be busy: never fail the test on convergence
			Progress: func(rs guestmem.RoundStats) { rounds = append(rounds, rs) }})
		require.NoError(t, err)
		for _, rs := range rounds {
			t.Logf("round %d: %d pages, %.1f MB/s on the wire, dirty %d B → est. %v (paused %v)", rs.Round, rs.Pages,
				rs.Bandwidth/1e6, rs.DirtyBytes, rs.Downtime, rs.Paused)
		}
		t.Logf("migrated in %v, downtime %v, %d bytes for %d populated, %d rounds", st.Total, st.Downtime, st.Bytes,
			st.Populated, st.Rounds)
		require.Less(t, rounds[0].Bandwidth, 60e6, "the link is shaped (400 Mbit/s is 50 MB/s)")
		// The destination's memory equals the source's at the pause.
		require.Equal(t, fmt.Sprintf("%08x", imageCRC(t, src)), r.expect(t, "received crc"))
		// The "guest" goes on there, from its counters.
		require.Equal(t, "ok", r.expect(t, "counters"))
		require.NoError(t, <-r.done)
		require.NoError(t, c.Resume()) // the source guest was left paused: run it again for the next test
	})

	t.Run("link cut mid-migration", func(t *testing.T) {
		r := startReceiver(t, l)
		var once sync.Once
		_, err := src.Migrate(context.Background(), dialConns(t, l), guestmem.MigrateOptions{
			Pause: c.Pause, Resume: c.Resume, MaxDowntime: time.Nanosecond, MaxRounds: 1000, IOTimeout: 2 * time.Second,
			Progress: func(rs guestmem.RoundStats) {
				if rs.Round == 1 {
					once.Do(func() { run1(t, "ip", "link", "set", l.host, "down") })
				}
			}})
		require.Error(t, err, "the cut link fails the migration, not hangs it")
		t.Logf("source: %v", err)
		run1(t, "ip", "link", "set", l.host, "up")
		_ = r.cmd.Process.Kill()
		<-r.done
		require.False(t, c.paused, "the source guest runs")
	})

	t.Run("receiver killed, then migrate again", func(t *testing.T) {
		r := startReceiver(t, l)
		var once sync.Once
		_, err := src.Migrate(context.Background(), dialConns(t, l), guestmem.MigrateOptions{
			Pause: c.Pause, Resume: c.Resume, IOTimeout: 5 * time.Second,
			Progress: func(rs guestmem.RoundStats) {
				once.Do(func() { _ = r.cmd.Process.Kill() })
			}})
		require.Error(t, err)
		t.Logf("source: %v", err)
		require.False(t, c.paused)
		<-r.done

		r = startReceiver(t, l)
		_, err = src.Migrate(context.Background(), dialConns(t, l), guestmem.MigrateOptions{Pause: c.Pause,
			Resume: c.Resume, OnLimit: guestmem.StopAndCopy})
		require.NoError(t, err, "still migratable")
		require.Equal(t, fmt.Sprintf("%08x", imageCRC(t, src)), r.expect(t, "received crc"))
		require.NoError(t, <-r.done)
		require.NoError(t, c.Resume())
	})

	t.Run("post-copy over the shaped link", func(t *testing.T) {
		r := startReceiver(t, l)
		st, err := src.Migrate(context.Background(), dialConns(t, l), guestmem.MigrateOptions{
			Pause: c.Pause, Resume: c.Resume, PostCopy: true, IOTimeout: 5 * time.Second})
		require.NoError(t, err)
		t.Logf("post-copy: switchover after %v of pause, %d bytes pushed after it, total %v", st.Downtime,
			st.PostCopyBytes, st.Total)
		r.expect(t, "post-copy: running")
		require.Equal(t, fmt.Sprintf("%08x", imageCRC(t, src)), r.expect(t, "received crc"))
		require.NoError(t, <-r.done)
		require.NoError(t, c.Resume())
	})

	t.Run("no convergence under the shaped link", func(t *testing.T) {
		run1(t, "tc", "qdisc", "change", "dev", l.host, "root", "tbf", "rate", "40mbit", "burst", "64kb", "latency",
			"100ms")
		r := startReceiver(t, l)
		_, err := src.Migrate(context.Background(), dialConns(t, l), guestmem.MigrateOptions{
			Pause: c.Pause, Resume: c.Resume, MaxDowntime: 10 * time.Millisecond, MaxRounds: 2, IOTimeout: 10 * time.Second})
		require.ErrorIs(t, err, guestmem.ErrNoConvergence, "the caller's policy ends it")
		require.False(t, c.paused, "never paused")
		_ = r.cmd.Process.Kill()
		<-r.done
	})
}

// acceptConns listens on addr, says "listening" (what startIn waits for),
// and accepts migNetConns connections, closed when t ends.
func acceptConns(t *testing.T, addr string) []io.ReadWriter {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	fmt.Println("listening")
	var conns []io.ReadWriter
	for range migNetConns {
		c, err := l.Accept()
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		conns = append(conns, c)
	}
	return conns
}

// TestMigrateReceiverProcess is the receiving side, run by
// TestMigrateBetweenNamespaces in its namespace.
func TestMigrateReceiverProcess(t *testing.T) {
	addr := os.Getenv("GMEM_MIGRATE_RECEIVER")
	if addr == "" {
		return // only as the receiving process
	}
	m, rs, err := guestmem.ReceiveMigration(context.Background(), acceptConns(t, addr), guestmem.WithMemfd())
	if err != nil {
		fmt.Println("receive error:", err)
		if errors.Is(err, guestmem.ErrMigrationProtocol) {
			os.Exit(3)
		}
		os.Exit(2)
	}
	defer m.Close()
	if rs.PostCopy != nil {
		fmt.Println("post-copy: running before the last pages are here")
		if err := rs.PostCopy.Wait(context.Background()); err != nil {
			fmt.Println("post-copy error:", err)
			os.Exit(4)
		}
	}
	fmt.Printf("received parts %d data %d\n", rs.Parts, rs.DataBytes)
	fmt.Printf("received crc %08x\n", imageCRC(t, m))
	// Continue the guest: its counters go on from where they were.
	pages := workingSet()
	before := make([]uint64, len(pages))
	for i, a := range pages {
		before[i], err = m.ReadUint64(a)
		require.NoError(t, err)
	}
	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	c := startCounter(t, m, pages)
	time.Sleep(50 * time.Millisecond)
	require.NoError(t, c.Pause(context.Background()))
	ok := "ok"
	for i, a := range pages {
		v, err := m.ReadUint64(a)
		require.NoError(t, err)
		if v <= before[i] {
			ok = fmt.Sprintf("page %#x: %d after %d", a, v, before[i])
			break
		}
	}
	require.NoError(t, c.Resume())
	fmt.Println("counters", ok)
}

func netListen() (net.Listener, error)      { return net.Listen("tcp", "127.0.0.1:0") }
func netDial(addr string) (net.Conn, error) { return net.Dial("tcp", addr) }
