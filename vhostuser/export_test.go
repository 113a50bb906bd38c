package vhostuser_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/vhostuser"
)

// childEnv makes the test binary a vhost-user back end (see TestMain); its
// value is the protocol features to offer, in hex.
const childEnv = "GMEM_VHOSTUSER_CHILD"

func TestMain(m *testing.M) {
	if v := os.Getenv(childEnv); v != "" {
		if err := backendChild(v); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// The guest layout of the two-process tests: two regions with a hole, room
// for a hot-added one past them.
var twoRegions = guestmem.Layout{{GPA: 0, Size: 2 * mib}, {GPA: gib, Size: 4 * mib}}

const hotGPA = 4 * gib

func pattern(gpa uint64) uint64 { return gpa ^ 0x5eed_0000_0000_5eed }
func reply(gpa uint64) uint64   { return ^gpa ^ 0xbeef }

var (
	parentAt = []uint64{0x1000, 0x1ff000, gib + 0x2000, gib + 0x3ff000} // the parent writes pattern here
	childAt  = []uint64{0x5000, gib + 0x7000, gib + 0x100008}           // the child writes reply with WriteAt
	rawAt    = uint64(0x9000)                                           // and here through Bytes, then MarkDirty
)

// backendChild is the other process: a Backend on fd 3, commands on stdin,
// answers on stdout ("ok ..." or "fail: ...").
func backendChild(proto string) error {
	pf, err := strconv.ParseUint(proto, 16, 64)
	if err != nil {
		return err
	}
	c, err := netConn(os.NewFile(3, "vhost-user"))
	if err != nil {
		return err
	}
	b := vhostuser.NewBackend(c, vhostuser.BackendConfig{ProtocolFeatures: pf})
	served := make(chan error, 1)
	go func() { served <- b.Serve() }()
	mm := b.Memory()
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.Fields(in.Text())
		answer, err := childCommand(mm, f)
		if err != nil {
			fmt.Printf("fail: %v\n", err)
			continue
		}
		fmt.Printf("ok %s\n", answer)
	}
	return errors.Join(<-served, b.Close())
}

func read64(mm *vhostuser.MemoryMap, gpa uint64) (uint64, error) {
	var b [8]byte
	if _, err := mm.ReadAt(b[:], int64(gpa)); err != nil {
		return 0, err
	}
	return uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16 | uint64(b[3])<<24 | uint64(b[4])<<32 |
		uint64(b[5])<<40 | uint64(b[6])<<48 | uint64(b[7])<<56, nil
}

func write64(mm *vhostuser.MemoryMap, gpa, v uint64) error {
	var b [8]byte
	for i := range b {
		b[i] = byte(v >> (8 * i))
	}
	_, err := mm.WriteAt(b[:], int64(gpa))
	return err
}

func expect(mm *vhostuser.MemoryMap, gpa uint64) error {
	v, err := read64(mm, gpa)
	if err != nil {
		return err
	}
	if v != pattern(gpa) {
		return fmt.Errorf("at %#x: read %#x, the parent wrote %#x", gpa, v, pattern(gpa))
	}
	return nil
}

// memfdMaps counts this process's mappings of the guest's memfd.
func memfdMaps() int {
	b, _ := os.ReadFile("/proc/self/maps")
	return strings.Count(string(b), "memfd:guest-ram")
}

func childCommand(mm *vhostuser.MemoryMap, f []string) (string, error) {
	switch f[0] {
	case "table": // read what the parent wrote, write replies, log a raw write
		for _, a := range parentAt {
			if err := expect(mm, a); err != nil {
				return "", err
			}
		}
		for _, a := range childAt {
			if err := write64(mm, a, reply(a)); err != nil {
				return "", err
			}
		}
		raw, err := mm.Bytes(rawAt, 8)
		if err != nil {
			return "", err
		}
		copy(raw, "raw-byte")
		return "", mm.MarkDirty(rawAt, 8)
	case "hot": // the hot-added region: read the parent's pattern, reply
		if err := expect(mm, hotGPA+0x1000); err != nil {
			return "", err
		}
		return "", write64(mm, hotGPA+0x4000, reply(hotGPA+0x4000))
	case "count": // what is mapped, and whether the hot region is gone
		_, err := mm.Translate(hotGPA, 8)
		return fmt.Sprintf("regions=%d maps=%d hot=%v", len(mm.Regions()), memfdMaps(),
			!errors.Is(err, vhostuser.ErrNoRegion)), nil
	case "verify", "answer": // start pages seed: the first quadword of each page is address^seed
		if len(f) != 4 {
			return "", fmt.Errorf("%s wants start, pages, seed", f[0])
		}
		var v [3]uint64
		for i := range v {
			n, err := strconv.ParseUint(f[i+1], 0, 64)
			if err != nil {
				return "", err
			}
			v[i] = n
		}
		for a := v[0]; a < v[0]+v[1]*page; a += page {
			if f[0] == "answer" {
				if err := write64(mm, a, a^v[2]); err != nil {
					return "", err
				}
				continue
			}
			got, err := read64(mm, a)
			if err != nil {
				return "", err
			}
			if got != a^v[2] {
				return "", fmt.Errorf("at %#x: read %#x, want %#x", a, got, a^v[2])
			}
		}
		return "", nil
	}
	return "", fmt.Errorf("unknown command %q", f)
}

// child is the parent's handle on the back-end process.
type child struct {
	t   *testing.T
	in  io.WriteCloser
	out *bufio.Scanner
	cmd *exec.Cmd
}

func startChild(t *testing.T, proto uint64) (*vhostuser.Frontend, *child) {
	front, back := socketpair(t)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+strconv.FormatUint(proto, 16))
	cmd.ExtraFiles = []*os.File{back}
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	require.NoError(t, err)
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	require.NoError(t, back.Close())
	c := &child{t: t, in: in, out: bufio.NewScanner(out), cmd: cmd}
	t.Cleanup(func() {
		if c.cmd.ProcessState == nil {
			c.cmd.Process.Kill()
			c.cmd.Wait()
		}
	})
	f, err := vhostuser.NewFrontend(unixConn(t, front))
	require.NoError(t, err)
	return f, c
}

// do sends a command and returns the child's answer after "ok".
func (c *child) do(cmd string) string {
	c.t.Helper()
	_, err := fmt.Fprintln(c.in, cmd)
	require.NoError(c.t, err)
	require.True(c.t, c.out.Scan(), "the child answers %q", cmd)
	line := c.out.Text()
	require.True(c.t, strings.HasPrefix(line, "ok"), "%s: %s", cmd, line)
	return strings.TrimSpace(strings.TrimPrefix(line, "ok"))
}

// wait ends the child's commands and waits for it to exit cleanly.
func (c *child) wait() {
	c.t.Helper()
	require.NoError(c.t, c.in.Close())
	done := make(chan error, 1)
	go func() { done <- c.cmd.Wait() }()
	select {
	case err := <-done:
		require.NoError(c.t, err, "the child exits cleanly")
	case <-time.After(30 * time.Second):
		c.t.Fatal("the child did not exit")
	}
}

// Another process receives the region table, maps guest RAM from the fds,
// reads what this process wrote and writes replies read back here; the
// pages it marks in the shared log are exactly what CollectDirty reports.
// A hot-added region reaches it (and the log grows to cover it); a removed
// one is unmapped there before it is released here. Both with
// CONFIGURE_MEM_SLOTS and REPLY_ACK, and with neither (SET_MEM_TABLE for
// every change, GET_FEATURES as the barrier).
func TestBackendProcessSharesGuestMemory(t *testing.T) {
	for _, tc := range []struct {
		name  string
		proto uint64
	}{
		{"slots+ack", vhostuser.ProtocolLogShmfd | vhostuser.ProtocolReplyAck | vhostuser.ProtocolConfigureMemSlots},
		{"table-only", vhostuser.ProtocolLogShmfd},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMemory(t, twoRegions, guestmem.WithMemfd(), guestmem.WithHotplug(64*mib))
			for _, a := range parentAt {
				require.NoError(t, m.WriteUint64(guestmem.GuestAddress(a), pattern(a)))
			}
			require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))

			f, c := startChild(t, tc.proto)
			require.Equal(t, tc.proto, f.ProtocolFeatures())
			e, err := vhostuser.Export(m, f)
			require.NoError(t, err)
			require.NoError(t, e.EnableDirtyLog())
			require.Len(t, e.Regions(), 2)

			c.do("table")
			for _, a := range childAt {
				v, err := m.ReadUint64(guestmem.GuestAddress(a))
				require.NoError(t, err)
				require.Equal(t, reply(a), v, "the child's reply at %#x", a)
			}
			raw := make([]byte, 8)
			_, err = m.ReadAt(raw, int64(rawAt))
			require.NoError(t, err)
			require.Equal(t, "raw-byte", string(raw))
			d, err := m.CollectDirty()
			require.NoError(t, err)
			require.Equal(t, pagesOf(append([]uint64{rawAt}, childAt...)...), spans(d),
				"exactly the pages the child logged")
			d, err = m.CollectDirty()
			require.NoError(t, err)
			require.Zero(t, d.Pages(), "collecting cleared the shared log")

			// Hotplug: past what the log covered, so it grows first.
			r, err := e.AddRegion(guestmem.RegionSpec{GPA: hotGPA, Size: 2 * mib})
			require.NoError(t, err)
			require.Len(t, e.Regions(), 3)
			require.NoError(t, m.WriteUint64(hotGPA+0x1000, pattern(hotGPA+0x1000)))
			_, err = m.CollectDirty() // forget this process's own write
			require.NoError(t, err)
			c.do("hot")
			v, err := m.ReadUint64(hotGPA + 0x4000)
			require.NoError(t, err)
			require.Equal(t, reply(hotGPA+0x4000), v)
			d, err = m.CollectDirty()
			require.NoError(t, err)
			require.Equal(t, pagesOf(hotGPA+0x4000), spans(d))
			require.Equal(t, "regions=3 maps=3 hot=true", c.do("count"))

			require.NoError(t, e.RemoveRegion(r.GPA))
			require.Equal(t, "regions=2 maps=2 hot=false", c.do("count"), "the child unmapped the region")
			_, err = m.Region(hotGPA)
			require.ErrorIs(t, err, guestmem.ErrHole)

			require.NoError(t, e.Close())
			require.NoError(t, f.Close())
			c.wait()
		})
	}
}

// netConn makes f, a unix socket, a *net.UnixConn.
func netConn(f *os.File) (*net.UnixConn, error) {
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return nil, fmt.Errorf("fd 3 is a %T, not a unix socket", c)
	}
	return uc, nil
}
