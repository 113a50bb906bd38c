package guestmem_test

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
)

// callbackWriter runs fn on its first Write, then accepts everything.
type callbackWriter struct {
	fn   func()
	done bool
}

func (w *callbackWriter) Write(p []byte) (int, error) {
	if !w.done {
		w.done = true
		w.fn()
	}
	return len(p), nil
}

// callbackReader runs fn on its first Read, then reads zeros.
type callbackReader struct {
	fn   func()
	done bool
}

func (r *callbackReader) Read(p []byte) (int, error) {
	if !r.done {
		r.done = true
		r.fn()
	}
	clear(p)
	return len(p), nil
}

// within fails the test if fn does not return in time: the calls under test
// used to deadlock.
func within(t *testing.T, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); fn() }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatalf("%s hangs", what)
	}
}

// A call from a user callback (a CopyTo writer, a CopyFrom reader, Save's
// writer, Prefault's Progress) that would wait for what the callback holds
// returns ErrReentered instead of deadlocking; what does not wait works.
func TestCallbacksCannotDeadlockTheMemory(t *testing.T) {
	ctx := context.Background()
	type call struct {
		name string
		fn   func(m *guestmem.Memory) error
	}
	waiting := []call{
		{"Close", func(m *guestmem.Memory) error { return m.Close() }},
		{"AddRegion", func(m *guestmem.Memory) error {
			_, err := m.AddRegion(guestmem.RegionSpec{GPA: 64 * mib, Size: 2 * mib})
			return err
		}},
		{"RemoveRegion", func(m *guestmem.Memory) error { return m.RemoveRegion(16 * mib) }},
		{"StartDirtyTracking", func(m *guestmem.Memory) error { return m.StartDirtyTracking(guestmem.HostWritesOnly()) }},
		{"StopDirtyTracking", func(m *guestmem.Memory) error { return m.StopDirtyTracking() }},
	}
	inSaveOnly := []call{ // these take the writer lock but leave the table as it is
		{"Register", func(m *guestmem.Memory) error { return m.Register(nil) }},
		{"Unregister", func(m *guestmem.Memory) error { return m.Unregister() }},
		{"CollectDirty", func(m *guestmem.Memory) error { _, err := m.CollectDirty(); return err }},
		{"Save", func(m *guestmem.Memory) error {
			_, err := m.Save(ctx, io.Discard, guestmem.SaveOptions{})
			return err
		}},
	}
	type holder struct {
		name string
		run  func(m *guestmem.Memory, cb func()) error
	}
	holders := []holder{
		{"CopyTo", func(m *guestmem.Memory, cb func()) error {
			_, err := m.CopyTo(&callbackWriter{fn: cb}, 0, 8192)
			return err
		}},
		{"CopyFrom", func(m *guestmem.Memory, cb func()) error {
			_, err := m.CopyFrom(64*1024, &callbackReader{fn: cb}, 8192)
			return err
		}},
		{"Save", func(m *guestmem.Memory, cb func()) error {
			_, err := m.Save(ctx, &callbackWriter{fn: cb}, guestmem.SaveOptions{})
			return err
		}},
		{"Prefault", func(m *guestmem.Memory, cb func()) error {
			first := true
			return m.Prefault(ctx, guestmem.PrefaultOptions{Workers: 2, Progress: func(done, total uint64) {
				if first {
					first = false
					cb()
				}
			}})
		}},
	}
	for _, h := range holders {
		calls := waiting
		if h.name == "Save" {
			calls = append(calls, inSaveOnly...)
		}
		for _, c := range calls {
			t.Run(h.name+"/"+c.name, func(t *testing.T) {
				m := newMemory(t, twoRegions, guestmem.WithMemfd(), guestmem.WithHotplug(4*mib))
				require.NoError(t, m.WriteUint64(0, 0x1234))
				require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
				var inner error
				within(t, h.name+" calling "+c.name, func() {
					require.NoError(t, h.run(m, func() { inner = c.fn(m) }))
				})
				require.ErrorIs(t, inner, guestmem.ErrReentered)
				require.Contains(t, inner.Error(), c.name)
				require.Contains(t, inner.Error(), h.name)
				// Nothing happened: the memory is open, tracking and whole.
				v, err := m.ReadUint64(0)
				require.NoError(t, err)
				require.Equal(t, uint64(0x1234), v)
				require.True(t, m.Tracking())
				require.Len(t, m.Regions(), 3)
				// After the holder returns, the call runs (Register(nil) and
				// Unregister then give their own errors).
				require.NotErrorIs(t, c.fn(m), guestmem.ErrReentered)
			})
		}
	}

	// What does not wait for the holder works from inside it.
	t.Run("Save/readers", func(t *testing.T) {
		m := newMemory(t, twoRegions, guestmem.WithMemfd())
		require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
		var fd int
		var tracking bool
		var buf [8]byte
		within(t, "Save's writer reading", func() {
			_, err := m.Save(ctx, &callbackWriter{fn: func() {
				fd, tracking = m.FD(), m.Tracking()
				require.Nil(t, m.VM())
				_, err := m.ReadAt(buf[:], 0)
				require.NoError(t, err)
				_, err = m.CopyTo(io.Discard, 0, 4096)
				require.NoError(t, err)
			}}, guestmem.SaveOptions{})
			require.NoError(t, err)
		})
		require.Positive(t, fd)
		require.True(t, tracking)
	})
	t.Run("CopyTo/CollectDirty", func(t *testing.T) {
		m := newMemory(t, twoRegions)
		require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
		require.NoError(t, m.WriteUint64(4096, 1))
		var d *guestmem.DirtySet
		within(t, "CopyTo's writer collecting", func() {
			_, err := m.CopyTo(&callbackWriter{fn: func() {
				var err error
				d, err = m.CollectDirty()
				require.NoError(t, err)
			}}, 0, 4096)
			require.NoError(t, err)
		})
		require.Equal(t, uint64(1), d.Pages())
	})
}

// Another goroutine's Close during a callback is not an error: it waits for
// the callback's call to return, then closes.
func TestCloseFromAnotherGoroutineWaitsForTheCallback(t *testing.T) {
	m := newMemory(t, twoRegions)
	entered, release := make(chan struct{}), make(chan struct{})
	closed := make(chan error, 1)
	var copyErr error
	within(t, "CopyTo with a concurrent Close", func() {
		go func() {
			<-entered
			closed <- m.Close()
		}()
		_, copyErr = m.CopyTo(&callbackWriter{fn: func() {
			close(entered)
			select {
			case err := <-closed:
				t.Errorf("Close returned %v while the writer ran", err)
			case <-time.After(100 * time.Millisecond):
			}
			close(release)
		}}, 0, 8192)
	})
	require.NoError(t, copyErr)
	<-release
	require.NoError(t, <-closed)
	_, err := m.ReadUint64(0)
	require.True(t, errors.Is(err, guestmem.ErrClosed))
}
