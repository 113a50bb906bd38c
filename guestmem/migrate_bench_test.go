package guestmem_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

// BenchmarkMigrate1GiB migrates a 1 GiB guest with half of it populated
// over loopback TCP (two connections), idle and with a goroutine dirtying
// pages at several rates, against one full Save streamed into Restore over
// one connection in the same run. Reported: downtime, wire bytes per
// populated byte, rounds.
// migConns is how many connections BenchmarkMigrate1GiB migrates over.
var migConns = 1

func BenchmarkMigrate1GiB(b *testing.B) {
	ctx := context.Background()
	const size = 1 << 30
	m, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: size}}, guestmem.WithMemfd())
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	chunk := make([]byte, mib)
	for i := range chunk {
		chunk[i] = byte(i*7 + 1)
	}
	for off := int64(0); off < size; off += 2 * mib {
		if _, err := m.WriteAt(chunk, off); err != nil {
			b.Fatal(err)
		}
	}
	if err := m.StartDirtyTracking(guestmem.HostWritesOnly()); err != nil {
		b.Fatal(err)
	}
	pairs := func(b *testing.B, n int) (send, recv []io.ReadWriter, closeAll func()) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		defer l.Close()
		var cs []net.Conn
		for range n {
			c, err := net.Dial("tcp", l.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			s, err := l.Accept()
			if err != nil {
				b.Fatal(err)
			}
			cs = append(cs, c, s)
			send, recv = append(send, c), append(recv, s)
		}
		return send, recv, func() {
			for _, c := range cs {
				c.Close()
			}
		}
	}
	b.Run("save+restore", func(b *testing.B) {
		b.SetBytes(size / 2)
		for b.Loop() {
			send, recv, closeAll := pairs(b, 1)
			done := make(chan error, 1)
			go func() {
				r, err := guestmem.Restore(ctx, []io.Reader{bufio.NewReaderSize(recv[0], 1<<20)})
				if err == nil {
					r.Close()
				}
				done <- err
			}()
			w := bufio.NewWriterSize(send[0], 1<<20)
			if _, err := m.Save(ctx, w, guestmem.SaveOptions{}); err != nil {
				b.Fatal(err)
			}
			w.Flush()
			send[0].(*net.TCPConn).CloseWrite()
			if err := <-done; err != nil {
				b.Fatal(err)
			}
			closeAll()
		}
	})
	for _, rate := range []int{0, 1000, 10000} { // pages dirtied per second
		b.Run(fmt.Sprintf("migrate/dirty=%dpages/s", rate), func(b *testing.B) {
			b.SetBytes(size / 2)
			var downtime time.Duration
			var bytes int64
			var populated uint64
			rounds := 0
			for b.Loop() {
				d := testenv.StartDirtier(rate, size, func(gpa, n uint64) {
					_ = m.WriteUint64(guestmem.GuestAddress(gpa), n)
				})
				send, recv, closeAll := pairs(b, migConns)
				done := make(chan error, 1)
				go func() {
					r, _, err := guestmem.ReceiveMigration(ctx, recv)
					if err == nil {
						r.Close()
					}
					done <- err
				}()
				st, err := m.Migrate(ctx, send, guestmem.MigrateOptions{
					Pause:  d.Pause,
					Resume: d.Resume,
				})
				d.Stop()
				if err != nil {
					b.Fatal(err)
				}
				if err := <-done; err != nil {
					b.Fatal(err)
				}
				closeAll()
				downtime, bytes, populated, rounds = st.Downtime, st.Bytes, st.Populated, st.Rounds
			}
			b.ReportMetric(float64(downtime.Microseconds())/1e3, "downtime-ms")
			b.ReportMetric(float64(bytes)/float64(populated), "sent/populated")
			b.ReportMetric(float64(rounds), "rounds")
		})
	}
}
