package testenv

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// Dirtier stands in for a guest that dirties memory at a steady rate, for
// the migration benchmarks: every millisecond it writes rate/1000 pages (at
// least one), each 97 pages after the last, wrapping at size bytes, unless
// paused. Its Pause and Resume fit guestmem.MigrateOptions.
type Dirtier struct {
	paused atomic.Bool
	stop   chan struct{}
	wg     sync.WaitGroup
}

// StartDirtier starts a Dirtier that calls write(gpa, n) for the n-th page
// it dirties; with rate 0 it writes nothing.
func StartDirtier(rate int, size uint64, write func(gpa, n uint64)) *Dirtier {
	d := &Dirtier{stop: make(chan struct{})}
	if rate <= 0 {
		return d
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		var n uint64
		for {
			select {
			case <-d.stop:
				return
			case <-tick.C:
			}
			for range max(1, rate/1000) {
				if !d.paused.Load() {
					write(n*4096*97%size, n)
				}
				n++
			}
		}
	}()
	return d
}

// Pause stops the writes until Resume.
func (d *Dirtier) Pause(context.Context) error { d.paused.Store(true); return nil }

// Resume lets the writes go on.
func (d *Dirtier) Resume() error { d.paused.Store(false); return nil }

// Stop ends the Dirtier and waits for its goroutine.
func (d *Dirtier) Stop() { close(d.stop); d.wg.Wait() }
