//go:build amd64

package tests

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"runtime"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

// listenIn opens a TCP listener inside network namespace ns: the socket
// stays in the namespace it was made in, so a receiver in this process is
// reached across the veth link like one on another host. The thread that
// entered the namespace ends with its goroutine (locked, never unlocked).
func listenIn(ns, addr string) (net.Listener, error) {
	type result struct {
		l   net.Listener
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		fd, err := unix.Open("/var/run/netns/"+ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			ch <- result{err: err}
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			ch <- result{err: err}
			return
		}
		l, err := net.Listen("tcp", addr)
		ch <- result{l, err}
	}()
	r := <-ch
	return r.l, r.err
}

// BenchmarkMigrateShaped1GiB is BenchmarkMigrate1GiB (guestmem) over a
// veth link shaped by tc tbf to 1 Gbit/s into another network namespace:
// a 1 GiB guest with a quarter of it populated, idle and with a goroutine
// dirtying pages at several rates, migrated over one connection, against
// one full Save streamed into Restore over one connection on the same link
// in the same run. Reported: downtime, wire bytes per populated byte,
// rounds.
func BenchmarkMigrateShaped1GiB(b *testing.B) {
	ctx := context.Background()
	const size = 1 << 30
	l := newNetLink(b, "1gbit")
	m, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: size}}, guestmem.WithMemfd())
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	chunk := make([]byte, mib)
	for i := range chunk {
		chunk[i] = byte(i*7 + 1)
	}
	for off := int64(0); off < size; off += 4 * mib {
		if _, err := m.WriteAt(chunk, off); err != nil {
			b.Fatal(err)
		}
	}
	if err := m.StartDirtyTracking(guestmem.HostWritesOnly()); err != nil {
		b.Fatal(err)
	}
	addr := net.JoinHostPort(l.peerIP, strconv.Itoa(migNetPort+10))
	ln, err := listenIn(l.ns, addr)
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	pair := func(b *testing.B) (send, recv net.Conn) {
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			b.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		return c, s
	}
	b.Run("save+restore", func(b *testing.B) {
		b.SetBytes(size / 4)
		for b.Loop() {
			send, recv := pair(b)
			done := make(chan error, 1)
			go func() {
				r, err := guestmem.Restore(ctx, []io.Reader{bufio.NewReaderSize(recv, 1<<20)})
				if err == nil {
					r.Close()
				}
				done <- err
			}()
			w := bufio.NewWriterSize(send, 1<<20)
			if _, err := m.Save(ctx, w, guestmem.SaveOptions{}); err != nil {
				b.Fatal(err)
			}
			w.Flush()
			send.(*net.TCPConn).CloseWrite()
			if err := <-done; err != nil {
				b.Fatal(err)
			}
			send.Close()
			recv.Close()
		}
	})
	for _, rate := range []int{0, 1000, 10000} { // pages dirtied per second
		b.Run(fmt.Sprintf("migrate/dirty=%dpages/s", rate), func(b *testing.B) {
			b.SetBytes(size / 4)
			var st guestmem.MigrateStats
			for b.Loop() {
				d := testenv.StartDirtier(rate, size, func(gpa, n uint64) {
					_ = m.WriteUint64(guestmem.GuestAddress(gpa), n)
				})
				send, recv := pair(b)
				done := make(chan error, 1)
				go func() {
					r, _, err := guestmem.ReceiveMigration(ctx, []io.ReadWriter{recv})
					if err == nil {
						r.Close()
					}
					done <- err
				}()
				var err error
				st, err = m.Migrate(ctx, []io.ReadWriter{send}, guestmem.MigrateOptions{
					Pause:  d.Pause,
					Resume: d.Resume,
					// Report what happened rather than fail on a busy machine.
					OnLimit: guestmem.StopAndCopy,
				})
				d.Stop()
				if err != nil {
					b.Fatal(err)
				}
				if err := <-done; err != nil {
					b.Fatal(err)
				}
				send.Close()
				recv.Close()
			}
			b.ReportMetric(float64(st.Downtime.Microseconds())/1e3, "downtime-ms")
			b.ReportMetric(float64(st.Bytes)/float64(st.Populated), "sent/populated")
			b.ReportMetric(float64(st.Rounds), "rounds")
		})
	}
}
