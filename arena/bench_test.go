package arena_test

import (
	"fmt"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
)

// Each benchmark that makes a claim has its baseline beside it, measured in
// the same run: compare the pairs, not figures from different runs.

// BenchmarkReserveAndMap reserves an arena and maps a 1 GiB memfd into it,
// then closes it: the cost must not grow with the size of the reservation.
func BenchmarkReserveAndMap(b *testing.B) {
	const mapped = 1 << 30
	fd := newMemfd(b, mapped)
	for _, size := range []int64{1 << 30, 1 << 40} {
		b.Run(fmt.Sprintf("arena=%dGiB", size>>30), func(b *testing.B) {
			for b.Loop() {
				a, err := arena.New(size)
				if err != nil {
					b.Fatal(err)
				}
				if err := a.AddFDMapping(0, mapped, fd, 0, arena.ProtReadWrite); err != nil {
					b.Fatal(err)
				}
				if err := a.Close(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkAccess1MiB compares ReadAt and WriteAt of 1 MiB of populated
// memory with copy between two Go slices of the same size.
func BenchmarkAccess1MiB(b *testing.B) {
	const size = 1 << 20
	m, err := arena.NewAnon(size, arena.Private(), arena.PopulateOnMap())
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	buf := make([]byte, size)
	src := make([]byte, size)
	for i := range src {
		src[i] = byte(i)
	}
	b.Run("copy-baseline", func(b *testing.B) {
		dst := make([]byte, size)
		b.SetBytes(size)
		for b.Loop() {
			copy(dst, src)
		}
	})
	b.Run("ReadAt", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			if _, err := m.ReadAt(buf, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("WriteAt", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			if _, err := m.WriteAt(src, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkPopulate1GiB populates 1 GiB of fresh memory with Populate and,
// as the baseline, with the same madvise(MADV_POPULATE_WRITE) made directly
// on a mapping made the same way.
func BenchmarkPopulate1GiB(b *testing.B) {
	const size = 1 << 30
	kinds := []struct {
		name string
		make func(b *testing.B) *arena.Mapping
	}{
		{"anon", func(b *testing.B) *arena.Mapping {
			return mustMap(b)(arena.NewAnon(size, arena.Private(), arena.Align(2<<20)))
		}},
		{"anon-hugepages", func(b *testing.B) *arena.Mapping {
			m := mustMap(b)(arena.NewAnon(size, arena.Private(), arena.Align(2<<20)))
			if err := m.UseHugepages(0, size); err != nil {
				b.Fatal(err)
			}
			return m
		}},
		{"memfd", func(b *testing.B) *arena.Mapping {
			fd, err := unix.MemfdCreate("bench", unix.MFD_CLOEXEC)
			if err != nil {
				b.Fatal(err)
			}
			defer unix.Close(fd) // the mapping keeps the memfd alive
			if err := unix.Ftruncate(fd, size); err != nil {
				b.Fatal(err)
			}
			return mustMap(b)(arena.NewFromFD(fd, 0, size, arena.Align(2<<20)))
		}},
	}
	// Warm up: the first gigabyte a process touches can cost host-level
	// faults on a virtual machine; neither contender should pay them.
	for _, k := range kinds {
		m := k.make(b)
		if err := m.Populate(0, size, arena.PopulateWrite); err != nil {
			b.Fatal(err)
		}
		if err := m.Close(); err != nil {
			b.Fatal(err)
		}
	}
	for _, k := range kinds {
		for _, direct := range []bool{true, false} {
			name := k.name + "/Populate"
			if direct {
				name = k.name + "/madvise-baseline"
			}
			b.Run(name, func(b *testing.B) {
				b.SetBytes(size)
				for b.Loop() {
					b.StopTimer()
					m := k.make(b)
					b.StartTimer()
					if direct {
						if _, _, e := unix.Syscall(unix.SYS_MADVISE, m.Addr(), size, unix.MADV_POPULATE_WRITE); e != 0 {
							b.Fatal(e)
						}
					} else if err := m.Populate(0, size, arena.PopulateWrite); err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					if err := m.Close(); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
			})
		}
	}
}

func mustMap(b *testing.B) func(*arena.Mapping, error) *arena.Mapping {
	return func(m *arena.Mapping, err error) *arena.Mapping {
		if err != nil {
			b.Fatal(err)
		}
		return m
	}
}

// BenchmarkReadUint64 is the fixed cost of one checked, fault-guarded access
// (bounds check, read lock, SetPanicOnFault and recover).
func BenchmarkReadUint64(b *testing.B) {
	m, err := arena.NewAnon(4096, arena.Private(), arena.PopulateOnMap())
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	for b.Loop() {
		if _, err := m.ReadUint64(64); err != nil {
			b.Fatal(err)
		}
	}
}
