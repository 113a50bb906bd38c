package arena_test

import (
	"bytes"
	"math/rand/v2"
	"os"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// TestMapFixedStaysInsideArena places guard pages directly against both ends
// of an arena, runs a long random sequence of operations on the arena
// (including out-of-range and partial ranges), and checks that the guards'
// contents and every mapping around the arena are exactly as before: MAP_FIXED
// never reached outside the arena's reservation.
func TestMapFixedStaysInsideArena(t *testing.T) {
	var e *engine
	var lo, hi uintptr
	for try := 0; ; try++ {
		e = newEngine(t)
		lo = e.a.Addr() - uintptr(page)
		hi = e.a.Addr() + uintptr(e.a.Size())
		errLo, errHi := mapGuard(lo), mapGuard(hi)
		if errLo == nil && errHi == nil {
			break
		}
		if errLo == nil {
			unmapGuard(lo)
		}
		if errHi == nil {
			unmapGuard(hi)
		}
		e.close()
		require.Less(t, try, 10, "could not place guard pages next to an arena: %v, %v", errLo, errHi)
	}
	defer e.close()
	defer unmapGuard(hi)
	defer unmapGuard(lo)

	mem, err := os.OpenFile("/proc/self/mem", os.O_RDWR, 0)
	require.NoError(t, err)
	defer mem.Close()
	pattern := bytes.Repeat([]byte("guard!"), int(page)/6+1)[:page]
	for _, g := range []uintptr{lo, hi} {
		_, err := mem.WriteAt(pattern, int64(g))
		require.NoError(t, err)
	}

	// The neighbourhood: VMAs within 16 MiB of the arena, the arena excluded.
	const near = 16 << 20
	outside := func() []pmVMA {
		var out []pmVMA
		for _, v := range pmParse(t) {
			inArena := v.start >= e.a.Addr() && v.end <= hi
			if !inArena && v.end > lo-near && v.start < hi+uintptr(page)+near {
				out = append(out, v)
			}
		}
		return out
	}
	before := outside()

	rng := rand.New(rand.NewPCG(3, 4))
	data := make([]byte, 20000)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	e.run(&input{b: data}, 3000)

	for _, g := range []uintptr{lo, hi} {
		got := make([]byte, page)
		_, err := mem.ReadAt(got, int64(g))
		require.NoError(t, err)
		require.Equal(t, pattern, got, "guard page at %#x changed", g)
	}
	// Every VMA that was there is still there, unchanged. (The Go runtime may
	// add mappings of its own meanwhile; a new VMA is not a change to these.)
	after := outside()
	for _, v := range before {
		require.Contains(t, after, v, "mapping outside the arena changed")
	}
	gl, ok := pmFind(after, lo)
	require.True(t, ok)
	require.Equal(t, "rw-p", gl.perms)
	gh, ok := pmFind(after, hi)
	require.True(t, ok)
	require.Equal(t, "rw-p", gh.perms)
}

// mapGuard maps one private read-write page at addr, failing rather than
// replacing anything already there.
func mapGuard(addr uintptr) error {
	r, _, errno := unix.Syscall6(unix.SYS_MMAP, addr, uintptr(page), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED_NOREPLACE, ^uintptr(0), 0)
	if errno != 0 {
		return errno
	}
	if r != addr {
		unix.Syscall(unix.SYS_MUNMAP, r, uintptr(page), 0)
		return unix.EEXIST
	}
	return nil
}

// unmapGuard unmaps a guard page that mapGuard placed.
func unmapGuard(addr uintptr) {
	unix.Syscall(unix.SYS_MUNMAP, addr, uintptr(page), 0)
}
