//go:build linux

package uffd

import (
	"context"
	"errors"
	"io/fs"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// A fault waiting when Close runs is released, with the fallback, and Close
// does not hang. The deterministic waiter is the kernel's (write(2) reading
// the page into a pipe): Poison fails it with EFAULT, ZeroFill gives it
// zeros. A Go thread waiting too is released: Poison gives it SIGBUS — or,
// if the runtime's preemption signal had it off the queue, retrying, at the
// instant Close drained the queue, the normal fault path's zeros (see the
// package doc). Close reports the range left registered; after it, an
// unserved page comes from the normal fault path (zeros).
func TestCloseReleasesWaitingFault(t *testing.T) {
	for _, b := range backings {
		for _, fb := range []Fallback{Poison, ZeroFill} {
			t.Run(b.name+"/"+fb.String(), func(t *testing.T) {
				size := 4 * b.pageSize
				mem := b.mmap(t, size)
				u := openFor(t, b, fb, mem)

				read := kernelRead(t, mem[b.pageSize:b.pageSize+16])
				waitQueued(t, u) // the kernel waits on page 1: nobody serves
				_, done := touch(mem, b.pageSize, []int{3}, false)
				closed := make(chan error, 1)
				go func() { closed <- u.Close() }()
				err := within(t, closed, 10*time.Second, "Close")
				require.ErrorIs(t, err, ErrRegistered, "the range was still registered")
				t.Log(err)

				kr := within(t, read, 10*time.Second, "kernel read")
				terr := within(t, done, 10*time.Second, "toucher")
				if fb == Poison {
					require.ErrorIs(t, kr.err, unix.EFAULT, "a poisoned page fails the kernel's access")
					if terr != nil {
						requireFaultAt(t, terr, addrOf(mem)+uintptr(3*b.pageSize)) // SIGBUS on the poisoned page
					}
					t.Logf("kernel: %v; Go thread: %v", kr.err, terr)
				} else {
					require.NoError(t, kr.err)
					require.Equal(t, make([]byte, 16), kr.data)
					require.NoError(t, terr)
					require.Zero(t, mem[3*b.pageSize])
				}
				// The userfaultfd is gone: an untouched page comes from the
				// normal fault path, as zeros.
				_, done = touch(mem, b.pageSize, []int{2}, false)
				require.NoError(t, within(t, done, 10*time.Second, "toucher after Close"))
				require.Zero(t, mem[2*b.pageSize])

				require.NoError(t, u.Close(), "a second Close")
				_, err = u.Copy(addrOf(mem), make([]byte, b.pageSize), WakeWaiters)
				require.ErrorIs(t, err, fs.ErrClosed)
				_, err = u.Register(addrOf(mem), uintptr(size))
				require.ErrorIs(t, err, fs.ErrClosed)
			})
		}
	}
}

// A fault a Serve loop has read but not served when Close runs — its
// handler still busy — is resolved by Close; the handler's late Copy gets
// fs.ErrClosed, and Serve returns it.
func TestCloseResolvesFaultsServeHolds(t *testing.T) {
	mem := mapAnon(t, 4*page)
	u := openFor(t, backings[0], Poison, mem)
	entered, release := make(chan Event, 1), make(chan struct{})
	var copyErr error
	handler := func(ev Event) error {
		entered <- ev
		<-release // Close runs meanwhile
		_, copyErr = u.Copy(ev.Page, make([]byte, page), WakeWaiters)
		return copyErr
	}
	served := make(chan error, 1)
	go func() { served <- u.Serve(context.Background(), handler) }()

	_, done := touch(mem, page, []int{0}, false)
	ev := within(t, entered, 5*time.Second, "handler")
	require.Equal(t, addrOf(mem), ev.Page)
	closed := make(chan error, 1)
	go func() { closed <- u.Close() }()
	// Close does not wait for the handler: it resolves the held fault.
	terr := within(t, done, 5*time.Second, "toucher")
	requireFaultAt(t, terr, addrOf(mem)) // poisoned by Close
	require.ErrorIs(t, within(t, closed, 5*time.Second, "Close"), ErrRegistered)
	close(release)
	require.ErrorIs(t, within(t, served, 5*time.Second, "Serve"), fs.ErrClosed)
	require.ErrorIs(t, copyErr, fs.ErrClosed)
}

// A handler that fails leaves no thread waiting: Serve resolves the fault
// with the fallback and returns the handler's error.
func TestHandlerErrorUsesFallback(t *testing.T) {
	for _, fb := range []Fallback{Poison, ZeroFill} {
		t.Run(fb.String(), func(t *testing.T) {
			mem := mapAnon(t, 4*page)
			u := openFor(t, backings[0], fb, mem)
			errSource := errors.New("snapshot unreadable")
			served := make(chan error, 1)
			go func() {
				served <- u.Serve(context.Background(), func(Event) error { return errSource })
			}()
			_, done := touch(mem, page, []int{3}, false)
			terr := within(t, done, 5*time.Second, "toucher")
			if fb == Poison {
				requireFaultAt(t, terr, addrOf(mem)+3*page)
			} else {
				require.NoError(t, terr)
				require.Zero(t, mem[3*page])
			}
			err := within(t, served, 5*time.Second, "Serve")
			require.ErrorIs(t, err, errSource)
			t.Log(err)
			require.NoError(t, u.Unregister(addrOf(mem), 4*page))
			require.NoError(t, u.Close())
		})
	}
}

// Close with nothing left registered (the memory Unregistered, or unmapped)
// reports nothing; Serve and ReadEvents stop on Close and on their context.
func TestCloseAndCancelStopReaders(t *testing.T) {
	mem := mapAnon(t, 4*page)
	u := openFor(t, backings[0], Poison, mem)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for _, c := range []context.Context{ctx, context.Background()} {
		wg.Add(2)
		go func() { defer wg.Done(); errs <- u.Serve(c, func(Event) error { return nil }) }()
		go func() {
			defer wg.Done()
			_, err := u.ReadEvents(c, make([]Event, 4))
			errs <- err
		}()
	}
	time.Sleep(20 * time.Millisecond) // let them block in poll
	cancel()
	require.ErrorIs(t, within(t, errs, 5*time.Second, "cancelled reader"), context.Canceled)
	require.ErrorIs(t, within(t, errs, 5*time.Second, "cancelled reader"), context.Canceled)
	require.NoError(t, u.Unregister(addrOf(mem), 4*page))
	require.NoError(t, u.Close())
	require.ErrorIs(t, within(t, errs, 5*time.Second, "reader at Close"), fs.ErrClosed)
	require.ErrorIs(t, within(t, errs, 5*time.Second, "reader at Close"), fs.ErrClosed)
	wg.Wait()
}
