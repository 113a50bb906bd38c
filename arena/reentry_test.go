package arena_test

import (
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/arena"
)

// funcWriter runs fn on its first Write.
type funcWriter struct {
	fn   func()
	done bool
}

func (w *funcWriter) Write(p []byte) (int, error) {
	if !w.done {
		w.done = true
		w.fn()
	}
	return len(p), nil
}

// funcReader runs fn on its first Read, then reads 0xaa bytes.
type funcReader struct {
	fn   func()
	done bool
}

func (r *funcReader) Read(p []byte) (int, error) {
	if !r.done {
		r.done = true
		r.fn()
	}
	for i := range p {
		p[i] = 0xaa
	}
	return len(p), nil
}

func returnsIn(t *testing.T, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); fn() }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatalf("%s hangs", what)
	}
}

// A CopyTo writer or CopyFrom reader that calls what would wait for the copy
// (Close, Protect, the arena's Add/Remove) gets ErrReentered, and nothing
// changes; it used to deadlock on the mapping's lock.
func TestCopyCallbacksCannotDeadlock(t *testing.T) {
	const size = 4 << 20
	calls := map[string]func(a *arena.Arena) error{
		"Close":   func(a *arena.Arena) error { return a.Close() },
		"Protect": func(a *arena.Arena) error { return a.Protect(0, 4096, arena.ProtRead) },
		"AddAnonMapping": func(a *arena.Arena) error {
			return a.AddAnonMapping(2<<20, 2<<20, arena.ProtReadWrite, arena.Private())
		},
		"RemoveMapping": func(a *arena.Arena) error { return a.RemoveMapping(0, 4096) },
	}
	for name, call := range calls {
		for _, copyOp := range []string{"CopyTo", "CopyFrom"} {
			t.Run(copyOp+"/"+name, func(t *testing.T) {
				a, err := arena.New(size)
				require.NoError(t, err)
				defer a.Close()
				require.NoError(t, a.AddAnonMapping(0, 2<<20, arena.ProtReadWrite, arena.Private()))
				require.NoError(t, a.StoreUint64(8192, 0x77))
				var inner error
				cb := func() { inner = call(a) }
				returnsIn(t, copyOp+" calling "+name, func() {
					var err error
					if copyOp == "CopyTo" {
						_, err = a.CopyTo(&funcWriter{fn: cb}, 0, 8192)
					} else {
						_, err = a.CopyFrom(0, &funcReader{fn: cb}, 8192)
					}
					require.NoError(t, err)
				})
				require.ErrorIs(t, inner, arena.ErrReentered)
				require.Contains(t, inner.Error(), name)
				v, err := a.LoadUint64(8192)
				require.NoError(t, err, "the arena is still open and mapped")
				require.Equal(t, uint64(0x77), v)
				require.NoError(t, call(a), "after the copy, %s works", name)
			})
		}
	}
}

// A callback's own accesses do not take the read lock again: with another
// goroutine waiting to remap the arena, a second read lock would queue
// behind it, and the copy would never end.
func TestCopyCallbackReadsWhileARemapWaits(t *testing.T) {
	a, err := arena.New(8 << 20)
	require.NoError(t, err)
	defer a.Close()
	require.NoError(t, a.AddAnonMapping(0, 4<<20, arena.ProtReadWrite, arena.Private()))
	require.NoError(t, a.StoreUint64(0, 0x55))
	remapped := make(chan error, 1)
	var got uint64
	returnsIn(t, "a callback reading while a remap waits", func() {
		_, err := a.CopyTo(&funcWriter{fn: func() {
			go func() { remapped <- a.RemoveMapping(2<<20, 2<<20) }()
			time.Sleep(100 * time.Millisecond) // let RemoveMapping queue for the lock
			var err error
			got, err = a.LoadUint64(0)
			require.NoError(t, err)
			_, err = a.CopyTo(io.Discard, 0, 4096) // nested copy
			require.NoError(t, err)
		}}, 0, 4096)
		require.NoError(t, err)
	})
	require.Equal(t, uint64(0x55), got)
	require.NoError(t, <-remapped, "the other goroutine's remap ran after the copy")
}
