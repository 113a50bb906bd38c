package guestmem

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// A sender that ends a post-copy without sending a unit it announced
// fails the receiver's restore with a protocol error; nothing hangs.
func TestPostCopyFINBeforeEveryUnit(t *testing.T) {
	ctx := context.Background()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	type result struct {
		m   *Memory
		rs  ReceiveStats
		err error
	}
	got := make(chan result, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		t.Cleanup(func() { c.Close() })
		m, rs, err := ReceiveMigration(ctx, []io.ReadWriter{c})
		got <- result{m, rs, err}
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	src, err := New(Layout{{GPA: 0, Size: 4 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if err := src.WriteUint64(1<<20, 42); err != nil {
		t.Fatal(err)
	}
	w := bufio.NewWriter(c)
	step := func(round uint32, write func() error) {
		t.Helper()
		if err := write(); err != nil {
			t.Fatal(err)
		}
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		r, _, err := readAck(c)
		if err != nil || r != round {
			t.Fatalf("ack %d: %d, %v", round, r, err)
		}
	}
	step(0, func() error { _, err := w.Write(hello{streams: 1, stripe: stripeSize}.marshal()); return err })
	step(0, func() error { _, err := src.Save(ctx, w, SaveOptions{}); return err })
	units := []Span{{GPA: 1 << 20, Size: fillUnit}, {GPA: 2 << 20, Size: fillUnit}}
	step(1, func() error { _, err := w.Write(pcopyBlock(units)); return err })
	r := <-got
	if r.err != nil || r.rs.PostCopy == nil {
		t.Fatalf("the receiver did not switch over: %v", r.err)
	}
	defer r.m.Close()
	if _, err := w.Write(finBlock(1)); err != nil { // no unit sent
		t.Fatal(err)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	werr := r.rs.PostCopy.Wait(wctx)
	if !errors.Is(werr, ErrMigrationProtocol) || !errors.Is(werr, ErrPostCopyLost) {
		t.Fatalf("Wait: %v, want a protocol error", werr)
	}
	if _, err := r.m.ReadUint64(1 << 20); !errors.Is(err, ErrRestoreFailed) {
		t.Fatalf("reading an unsent unit: %v, want ErrRestoreFailed", err)
	}
}
