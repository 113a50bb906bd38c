package procfs

import (
	"errors"
	"io"
	"math"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// smapsText is /proc/self/smaps as a 6.x kernel writes it, cut down: a
// file, anonymous THP memory with no path, a path with spaces, a deleted
// memfd with shmem PMDs, a hugetlb VMA, and the vsyscall page. It carries
// a field this parser does not know and a line it cannot parse.
const smapsText = `00400000-00401000 r-xp 00001000 fe:01 1234                       /usr/bin/gmem
Size:                  4 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                   4 kB
Pss:                   4 kB
Pss_Dirty:             0 kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:         4 kB
Private_Dirty:         0 kB
Referenced:            4 kB
Anonymous:             0 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
THPeligible:           0
VmFlags: rd ex mr mw me 
7f0000000000-7f0000400000 rw-p 00000000 00:00 0 
Size:               4096 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                2060 kB
Pss:                2060 kB
Pss_Dirty:          2060 kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:      2060 kB
Referenced:         2060 kB
Anonymous:          2060 kB
KSM:                   0 kB
LazyFree:             12 kB
AnonHugePages:      2048 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                 20 kB
SwapPss:              20 kB
Locked:                0 kB
FutureField:          99 kB
Garbage line
THPeligible:           1
VmFlags: rd wr mr mw me ac hg dd
7f0000400000-7f0000401000 rw-s 00002000 00:2d 77                         /tmp/my guest  ram.img
Size:                  4 kB
Rss:                   4 kB
Shared_Dirty:          4 kB
Locked:                4 kB
VmFlags: rd wr sh mr mw me ms lf lo
7f0000600000-7f0000a00000 rw-s 00000000 00:01 4242                       /memfd:guest ram (deleted)
Size:               4096 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                4096 kB
Shared_Clean:       2048 kB
Shared_Dirty:       2048 kB
ShmemPmdMapped:     4096 kB
FilePmdMapped:         0 kB
VmFlags: rd wr sh mr mw me ms dc dd
7f0000c00000-7f0001000000 rw-s 00000000 00:10 999                        /anon_hugepage (deleted)
Size:               4096 kB
KernelPageSize:     2048 kB
MMUPageSize:        2048 kB
Rss:                   0 kB
Shared_Hugetlb:     2048 kB
Private_Hugetlb:    4096 kB
VmFlags: rd wr sh mr mw me ms de ht dd
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
Size:                  4 kB
Rss:                   0 kB
VmFlags: ex
`

func TestParseSmaps(t *testing.T) {
	vmas, err := parse(strings.NewReader(smapsText), 0, math.MaxUint)
	require.NoError(t, err)
	require.Len(t, vmas, 6)

	require.Equal(t, VMA{
		Start: 0x400000, End: 0x401000, Perms: "r-xp", Offset: 0x1000, Dev: "fe:01", Inode: 1234,
		Path: "/usr/bin/gmem", Size: 4 << 10, KernelPageSize: 4 << 10, MMUPageSize: 4 << 10,
		Rss: 4 << 10, Pss: 4 << 10, PrivateClean: 4 << 10, Referenced: 4 << 10,
		Flags: []string{"rd", "ex", "mr", "mw", "me"},
	}, vmas[0])

	require.Equal(t, VMA{
		Start: 0x7f0000000000, End: 0x7f0000400000, Perms: "rw-p", Dev: "00:00",
		Size: 4 << 20, KernelPageSize: 4 << 10, MMUPageSize: 4 << 10,
		Rss: 2060 << 10, Pss: 2060 << 10, PssDirty: 2060 << 10, PrivateDirty: 2060 << 10,
		Referenced: 2060 << 10, Anonymous: 2060 << 10, LazyFree: 12 << 10, AnonHugePages: 2 << 20,
		Swap: 20 << 10, SwapPss: 20 << 10, THPEligible: true,
		Flags: []string{"rd", "wr", "mr", "mw", "me", "ac", "hg", "dd"},
	}, vmas[1], "no path; an unknown field and a bad line are skipped")

	spaces := vmas[2]
	require.Equal(t, "/tmp/my guest  ram.img", spaces.Path, "spaces inside a path are kept as they are")
	require.Equal(t, uint64(0x2000), spaces.Offset)
	require.Equal(t, "00:2d", spaces.Dev)
	require.Equal(t, int64(4<<10), spaces.Locked)
	require.True(t, spaces.HasFlag("lf"))
	require.False(t, spaces.HasFlag("hg"))

	memfd := vmas[3]
	require.Equal(t, "/memfd:guest ram (deleted)", memfd.Path)
	require.Equal(t, uint64(4242), memfd.Inode)
	require.Equal(t, int64(4<<20), memfd.ShmemPmdMapped)
	require.Equal(t, int64(2<<20), memfd.SharedClean)
	require.Equal(t, int64(2<<20), memfd.SharedDirty)

	huge := vmas[4]
	require.Equal(t, "/anon_hugepage (deleted)", huge.Path)
	require.Equal(t, int64(2<<20), huge.KernelPageSize)
	require.Equal(t, int64(2<<20), huge.SharedHugetlb)
	require.Equal(t, int64(4<<20), huge.PrivateHugetlb)
	require.Zero(t, huge.Rss, "hugetlb pages are not in Rss")
	require.True(t, huge.HasFlag("ht"))

	require.Equal(t, uintptr(0xffffffffff600000), vmas[5].Start)
	require.Equal(t, "--xp", vmas[5].Perms)
	require.Equal(t, "[vsyscall]", vmas[5].Path)
	require.Equal(t, []string{"ex"}, vmas[5].Flags)
}

// failAfter is smapsText followed by a read error: a parse that reads past
// where it should stop fails.
func failAfter() io.Reader {
	return io.MultiReader(strings.NewReader(smapsText),
		strings.NewReader("ffffffffff700000-ffffffffff701000 r--p 00000000 00:00 0\n"),
		&errReader{})
}

type errReader struct{}

func (*errReader) Read([]byte) (int, error) { return 0, errors.New("read past the range") }

func TestParseRange(t *testing.T) {
	starts := func(vmas []VMA) []uintptr {
		var out []uintptr
		for _, v := range vmas {
			out = append(out, v.Start)
		}
		return out
	}
	for _, c := range []struct {
		name   string
		lo, hi uintptr
		want   []uintptr
	}{
		{"one page inside a VMA", 0x7f0000001000, 0x7f0000002000, []uintptr{0x7f0000000000}},
		{"ends are exclusive", 0x7f0000400000, 0x7f0000600000, []uintptr{0x7f0000400000}},
		{"across three", 0x7f00003ff000, 0x7f0000600001, []uintptr{0x7f0000000000, 0x7f0000400000, 0x7f0000600000}},
		{"a hole", 0x7f0000a00000, 0x7f0000c00000, nil},
		{"below everything", 0x1000, 0x2000, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			vmas, err := parse(failAfter(), c.lo, c.hi)
			require.NoError(t, err, "the parse read past the first VMA at or above hi")
			require.Equal(t, c.want, starts(vmas))
		})
	}
	_, err := parse(failAfter(), 0, math.MaxUint)
	require.ErrorContains(t, err, "read past the range", "a read error is returned")
}

func TestParseMaps(t *testing.T) {
	const maps = `00400000-00401000 r-xp 00001000 fe:01 1234                       /usr/bin/gmem
7f0000000000-7f0000400000 rw-p 00000000 00:00 0 
7f0000400000-7f0000401000 rw-s 00002000 00:2d 77                         /tmp/my guest  ram.img
7f0000600000-7f0000a00000 rw-s 00000000 00:01 4242                       /memfd:guest ram (deleted)
7f0100000000-7f0200000000 rw-s 00000000 00:01 2048      /dev/zero (deleted)
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
`
	vmas, err := parse(strings.NewReader(maps), 0, math.MaxUint)
	require.NoError(t, err)
	require.Equal(t, []VMA{
		{Start: 0x400000, End: 0x401000, Perms: "r-xp", Offset: 0x1000, Dev: "fe:01", Inode: 1234, Path: "/usr/bin/gmem"},
		{Start: 0x7f0000000000, End: 0x7f0000400000, Perms: "rw-p", Dev: "00:00"},
		{Start: 0x7f0000400000, End: 0x7f0000401000, Perms: "rw-s", Offset: 0x2000, Dev: "00:2d", Inode: 77,
			Path: "/tmp/my guest  ram.img"},
		{Start: 0x7f0000600000, End: 0x7f0000a00000, Perms: "rw-s", Dev: "00:01", Inode: 4242,
			Path: "/memfd:guest ram (deleted)"},
		{Start: 0x7f0100000000, End: 0x7f0200000000, Perms: "rw-s", Dev: "00:01", Inode: 2048, Path: "/dev/zero (deleted)"},
		{Start: 0x7ffc00000000, End: 0x7ffc00021000, Perms: "rw-p", Dev: "00:00", Path: "[stack]"},
	}, vmas)
}

func TestParseOddLines(t *testing.T) {
	long := "/" + strings.Repeat("d", 100<<10) // past the first buffer
	text := "7f0000000000-7f0000001000 r--p 00000000 00:00 0 " + long + "\n" +
		"Rss:                   4 kB\n" +
		"Rss:                   x kB\n" + // a bad number is skipped, not zero
		"Swap:                  8 MB\n" + // not kB: skipped
		"zz-yy r--p 0 0 0\n" + // not a header: skipped, the fields stay with the VMA above
		"Locked:                4 kB\n" +
		"7f0000001000-7f0000002000 r--p 00000000 00:00\n" + // no inode: not a VMA
		"Swap:                  4 kB\n" // belongs to no VMA
	vmas, err := parse(strings.NewReader(text), 0, math.MaxUint)
	require.NoError(t, err)
	require.Len(t, vmas, 1)
	require.Equal(t, long, vmas[0].Path)
	require.Equal(t, int64(4<<10), vmas[0].Rss)
	require.Equal(t, int64(4<<10), vmas[0].Locked)
	require.Zero(t, vmas[0].Swap)
}

// TestLive reads this process's files: a private anonymous mapping and a
// shared memfd mapping made here must appear with what was done to them.
func TestLive(t *testing.T) {
	ps := os.Getpagesize()
	anon, err := unix.Mmap(-1, 0, 4*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	require.NoError(t, err)
	defer unix.Munmap(anon)
	require.NoError(t, unix.Madvise(anon, unix.MADV_DONTDUMP))
	anon[0], anon[2*ps] = 1, 1

	fd, err := unix.MemfdCreate("procfs test", unix.MFD_CLOEXEC)
	require.NoError(t, err)
	defer unix.Close(fd)
	require.NoError(t, unix.Ftruncate(fd, int64(2*ps)))
	var st unix.Stat_t
	require.NoError(t, unix.Fstat(fd, &st))
	shared, err := unix.Mmap(fd, int64(ps), ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	require.NoError(t, err)
	defer unix.Munmap(shared)
	shared[0] = 1

	a, s := unixAddr(anon), unixAddr(shared)
	find := func(vmas []VMA, addr uintptr) VMA {
		t.Helper()
		for _, v := range vmas {
			if v.Contains(addr) {
				return v
			}
		}
		t.Fatalf("no VMA contains %#x", addr)
		return VMA{}
	}

	maps, err := Maps()
	require.NoError(t, err)
	smaps, err := Smaps()
	require.NoError(t, err)
	for _, vmas := range [][]VMA{maps, smaps} {
		for i := 1; i < len(vmas); i++ {
			require.LessOrEqual(t, vmas[i-1].End, vmas[i].Start, "VMAs come in address order")
		}
		v := find(vmas, a)
		require.Equal(t, "rw-p", v.Perms)
		require.Zero(t, v.Inode)
		v = find(vmas, s)
		require.Equal(t, VMA{Start: s, End: s + uintptr(ps), Perms: "rw-s", Offset: uint64(ps), Dev: v.Dev,
			Inode: st.Ino, Path: "/memfd:procfs test (deleted)"}, VMA{Start: v.Start, End: v.End,
			Perms: v.Perms, Offset: v.Offset, Dev: v.Dev, Inode: v.Inode, Path: v.Path})
		require.Equal(t, uint64(st.Dev), uint64(unix.Mkdev(parseDev(t, v.Dev))))
	}

	r, err := SmapsRange(a, a+uintptr(4*ps))
	require.NoError(t, err)
	require.Len(t, r, 1)
	require.True(t, r[0].HasFlag("dd"), "VmFlags %v", r[0].Flags)
	require.GreaterOrEqual(t, r[0].Rss, int64(2*ps), "both written pages are resident")
	require.GreaterOrEqual(t, r[0].Anonymous, int64(2*ps))

	r, err = SmapsRange(s, s+1)
	require.NoError(t, err)
	require.Len(t, r, 1)
	require.Equal(t, int64(ps), r[0].Size)
	require.Equal(t, int64(ps), r[0].Rss)
	require.True(t, r[0].HasFlag("sh"))

	roll, err := SmapsRollup(os.Getpid())
	require.NoError(t, err)
	require.Equal(t, "[rollup]", roll.Path)
	var rss int64
	for _, v := range smaps {
		rss += v.Rss
	}
	require.Positive(t, roll.Rss)
	require.InDelta(t, rss, roll.Rss, float64(rss)/2, "the rollup sums the VMAs (which change as the test runs)")

	_, err = SmapsRollup(-1)
	require.ErrorIs(t, err, os.ErrNotExist)
}

func parseDev(t *testing.T, dev string) (major, minor uint32) {
	t.Helper()
	maj, min, ok := strings.Cut(dev, ":")
	require.True(t, ok, dev)
	a, _, ok1 := hexUntil([]byte(maj+" "), ' ')
	b, _, ok2 := hexUntil([]byte(min+" "), ' ')
	require.True(t, ok1 && ok2, dev)
	return uint32(a), uint32(b)
}

// BenchmarkSmapsRange reads the VMA of one page from this process's smaps,
// and all of smaps for comparison.
func BenchmarkSmapsRange(b *testing.B) {
	ps := os.Getpagesize()
	mem, err := unix.Mmap(-1, 0, ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(mem)
	a := unixAddr(mem)
	b.Run("range", func(b *testing.B) {
		for b.Loop() {
			if _, err := SmapsRange(a, a+1); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("all", func(b *testing.B) {
		for b.Loop() {
			if _, err := Smaps(); err != nil {
				b.Fatal(err)
			}
		}
	})
}
