package arena_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/internal/procfs"
)

// TestMapFixedStaysInsideArena places guard pages directly against both ends
// of an arena, runs a long random sequence of operations on the arena
// (Replace and partial RemoveMapping included, and accesses around both ends
// and past the end), and checks that the guards and every mapping around the
// arena are as before: MAP_FIXED, mprotect and madvise never reached outside
// the arena's reservation.
//
// How this stays robust while the Go runtime (and the race detector) map
// memory of their own concurrently:
//
//   - The guards are MAP_SHARED pages of a memfd of their own. The kernel never
//     merges them with the runtime's anonymous memory, so each guard must stay
//     exactly one VMA of exactly one page, with the same permissions, inode,
//     file offset and VmFlags (a stray madvise or mlock changes those), and
//     with its bytes unchanged (read through /proc/self/mem, which needs no
//     unsafe, and through the memfd). Any MAP_FIXED, munmap, mprotect or
//     madvise range that starts inside the arena and runs past either end must
//     cross a guard, and is caught here.
//   - Farther away, within 16 MiB of the arena, VMAs are compared page by page
//     rather than line by line: every page mapped before must still be mapped
//     with the same permissions, inode and file offset. The runtime growing a
//     VMA of its own, or a new mapping merging into an old one, changes the
//     lines of /proc/self/maps but not what any old page is, so it is not
//     reported; a neighbour re-protected, unmapped or mapped over is.
func TestMapFixedStaysInsideArena(t *testing.T) {
	gfd, err := unix.MemfdCreate("guard", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(gfd)
	require.NoError(t, unix.Ftruncate(gfd, 2*page))
	var gst unix.Stat_t
	require.NoError(t, unix.Fstat(gfd, &gst))

	var e *engine
	var lo, hi uintptr
	for try := 0; ; try++ {
		e = newEngine(t)
		lo = e.a.Addr() - uintptr(page)
		hi = e.a.Addr() + uintptr(e.a.Size())
		errLo, errHi := mapGuard(lo, gfd, 0), mapGuard(hi, gfd, page)
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
		if try == 9 {
			t.Fatalf("could not place guard pages next to an arena in 10 tries: %v, %v", errLo, errHi)
		}
	}
	defer e.close()
	defer unmapGuard(hi)
	defer unmapGuard(lo)

	mem, err := os.OpenFile("/proc/self/mem", os.O_RDWR, 0)
	require.NoError(t, err)
	defer mem.Close()
	guards := []struct {
		addr  uintptr
		fdOff int64
		fill  []byte
	}{
		{lo, 0, bytes.Repeat([]byte("low guard! "), int(page)/11+1)[:page]},
		{hi, page, bytes.Repeat([]byte("HIGH GUARD? "), int(page)/12+1)[:page]},
	}
	for _, g := range guards {
		_, err := mem.WriteAt(g.fill, int64(g.addr))
		require.NoError(t, err)
	}

	// The neighbourhood: VMAs within 16 MiB of the arena, the arena and the
	// guards excluded.
	const near = 16 << 20
	outside := func() []pmVMA {
		var out []pmVMA
		for _, v := range pmParse(t) {
			inside := v.start >= lo && v.end <= hi+uintptr(page)
			if !inside && v.end > lo-near && v.start < hi+uintptr(page)+near {
				out = append(out, v)
			}
		}
		return out
	}
	guardVMA := func(addr uintptr) (pmVMA, []string) {
		v, ok := pmFind(pmParse(t), addr)
		require.True(t, ok, "guard page at %#x is unmapped", addr)
		return v, pmVmFlags(t, addr)
	}
	lowVMA, lowFlags := guardVMA(lo)
	highVMA, highFlags := guardVMA(hi)
	require.Equal(t, pmVMA{start: lo, end: lo + uintptr(page), perms: "rw-s", offset: 0, inode: gst.Ino}, lowVMA)
	require.Equal(t, pmVMA{start: hi, end: hi + uintptr(page), perms: "rw-s", offset: uint64(page), inode: gst.Ino}, highVMA)
	before := outside()
	require.NotEmpty(t, before, "nothing mapped within 16 MiB of the arena: the neighbourhood check would check nothing")

	rng := rand.New(rand.NewPCG(3, 4))
	data := make([]byte, 24000)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	fzRun(e, &input{b: data}, 3000)
	t.Logf("%d operations; outcomes (succeeded, failed): %v", e.step, pmOutcomes(e.outcomes))

	for _, g := range guards {
		got := make([]byte, page)
		_, err := mem.ReadAt(got, int64(g.addr))
		require.NoError(t, err)
		require.Equal(t, g.fill, got, "guard page at %#x changed", g.addr)
		_, err = unix.Pread(gfd, got, g.fdOff)
		require.NoError(t, err)
		require.Equal(t, g.fill, got, "guard memfd at %#x changed", g.fdOff)
	}
	v, flags := guardVMA(lo)
	require.Equal(t, lowVMA, v, "the low guard's VMA changed")
	require.Equal(t, lowFlags, flags, "the low guard's VmFlags changed")
	v, flags = guardVMA(hi)
	require.Equal(t, highVMA, v, "the high guard's VMA changed")
	require.Equal(t, highFlags, flags, "the high guard's VmFlags changed")

	after := outside()
	for _, b := range before {
		for pos := b.start; pos < b.end; {
			a, ok := pmFind(after, pos)
			require.True(t, ok, "page %#x of %+v, near the arena, is no longer mapped", pos, b)
			require.Equal(t, b.perms, a.perms, "page %#x of %+v near the arena now has permissions %s", pos, b, a.perms)
			require.Equal(t, b.inode, a.inode, "page %#x of %+v near the arena now maps inode %d", pos, b, a.inode)
			if b.inode != 0 {
				require.Equal(t, b.offset+uint64(pos-b.start), a.offset+uint64(pos-a.start),
					"page %#x of %+v near the arena now maps another file offset (%+v)", pos, b, a)
			}
			pos = min(a.end, b.end)
		}
	}
}

// mapGuard maps page fdOff of fd shared and read-write at addr, failing
// rather than replacing anything already there.
func mapGuard(addr uintptr, fd int, fdOff int64) error {
	r, _, errno := unix.Syscall6(unix.SYS_MMAP, addr, uintptr(page), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_SHARED|unix.MAP_FIXED_NOREPLACE, uintptr(fd), uintptr(fdOff))
	if errno != 0 {
		return errno
	}
	if r != addr { // a kernel before 4.17 takes MAP_FIXED_NOREPLACE as a hint
		unix.Syscall(unix.SYS_MUNMAP, r, uintptr(page), 0)
		return unix.EEXIST
	}
	return nil
}

// unmapGuard unmaps a guard page that mapGuard placed.
func unmapGuard(addr uintptr) {
	unix.Syscall(unix.SYS_MUNMAP, addr, uintptr(page), 0)
}

// pmVmFlags returns the VmFlags of the VMA that contains addr, from
// /proc/self/smaps.
func pmVmFlags(t testing.TB, addr uintptr) []string {
	t.Helper()
	vmas, err := procfs.SmapsRange(addr, addr+1)
	require.NoError(t, err)
	if len(vmas) == 0 {
		t.Fatalf("no VmFlags for %#x in /proc/self/smaps", addr)
	}
	return vmas[0].Flags
}

// pmOutcomes formats an engine's outcome counts for the log.
func pmOutcomes(o map[string]*[2]int) string {
	names := make([]string, 0, len(o))
	for name := range o {
		names = append(names, name)
	}
	slices.Sort(names)
	var b strings.Builder
	for _, name := range names {
		fmt.Fprintf(&b, " %s %d/%d", name, o[name][0], o[name][1])
	}
	return b.String()
}
