package guestmem_test

import (
	"context"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/guestmem"
)

// Baselines are measured in the same run as what they are compared with.

// BenchmarkSetup64GiB times New for a 64 GiB guest with the x86 layout and no
// prefault: layout validation, memfd creation and sealing, the arena
// reservation, mapping both regions and the default advice. Close is outside
// the timer.
func BenchmarkSetup64GiB(b *testing.B) {
	for _, backing := range []guestmem.Backing{guestmem.Anonymous, guestmem.Memfd} {
		b.Run(backing.String(), func(b *testing.B) {
			for b.Loop() {
				m, err := guestmem.New(guestmem.X86Layout(64<<30), withBacking(backing))
				if err != nil {
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

// BenchmarkPrefault4GiB compares Prefault of a 4 GiB guest (x86 layout: two
// regions) with the same MADV_POPULATE_WRITE calls made directly from the
// same number of threads, and with memset over memory already populated (the
// machine's write bandwidth, an upper bound for any prefault).
func BenchmarkPrefault4GiB(b *testing.B) {
	const size = 4 << 30
	workers := runtime.GOMAXPROCS(0)
	layout := guestmem.X86Layout(size)
	for _, backing := range []guestmem.Backing{guestmem.Anonymous, guestmem.Memfd} {
		fresh := func(b *testing.B) *guestmem.Memory {
			m, err := guestmem.New(layout, withBacking(backing))
			if err != nil {
				b.Fatal(err)
			}
			return m
		}
		// Warm up: on a virtual machine the first gigabytes a process touches
		// may cost host-level faults; no contender should pay them.
		warm := fresh(b)
		if err := warm.Prefault(context.Background(), guestmem.PrefaultOptions{}); err != nil {
			b.Fatal(err)
		}
		warm.Close()

		variants := []struct {
			name      string
			populated bool // populate (and run once) before the timer starts
			run       func(m *guestmem.Memory) error
		}{
			{"madvise-baseline", false, func(m *guestmem.Memory) error {
				return parallelOverRegions(m, workers, func(addr uintptr, n uint64) error {
					if _, _, e := unix.Syscall(unix.SYS_MADVISE, addr, uintptr(n), unix.MADV_POPULATE_WRITE); e != 0 {
						return e
					}
					return nil
				})
			}},
			{"Prefault", false, func(m *guestmem.Memory) error {
				return m.Prefault(context.Background(), guestmem.PrefaultOptions{Workers: workers})
			}},
			{"memset-limit", true, func(m *guestmem.Memory) error {
				return parallelOverRegions(m, workers, func(addr uintptr, n uint64) error {
					s, err := sliceAt(m, addr, n)
					if err == nil {
						clear(s)
					}
					return err
				})
			}},
		}
		for _, v := range variants {
			b.Run(backing.String()+"/"+v.name, func(b *testing.B) {
				b.SetBytes(size)
				for b.Loop() {
					b.StopTimer()
					m := fresh(b)
					if v.populated {
						// Populate, then run the variant once untimed: on a
						// shadow-paging host (this development VM) the first
						// user-space touch of each 4 KiB page costs a
						// hypervisor fault even after the kernel populated it,
						// and that is not write bandwidth.
						if err := m.Prefault(context.Background(), guestmem.PrefaultOptions{}); err != nil {
							b.Fatal(err)
						}
						if err := v.run(m); err != nil {
							b.Fatal(err)
						}
					}
					b.StartTimer()
					if err := v.run(m); err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					m.Close()
					b.StartTimer()
				}
			})
		}
	}
}

// parallelOverRegions splits every region into workers equal, 2 MiB-aligned
// parts and runs fn on them from exactly workers goroutines: goroutine w
// takes part w of each region in turn.
func parallelOverRegions(m *guestmem.Memory, workers int, fn func(addr uintptr, n uint64) error) error {
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	regions := m.Regions()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for _, r := range regions {
				part := (r.Size / uint64(workers)) &^ (2<<20 - 1)
				off, n := uint64(w)*part, part
				if w == workers-1 {
					n = r.Size - off
				}
				if err := fn(r.HostAddr+uintptr(off), n); err != nil {
					errs <- err
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// sliceAt returns guest memory at a host address of one of m's regions.
func sliceAt(m *guestmem.Memory, addr uintptr, n uint64) ([]byte, error) {
	for _, r := range m.Regions() {
		if addr >= r.HostAddr && addr < r.HostAddr+uintptr(r.Size) {
			return m.Slice(r.GPA+guestmem.GuestAddress(addr-r.HostAddr), n)
		}
	}
	return nil, guestmem.ErrHole
}

// BenchmarkAccess1MiB compares guest-address ReadAt and WriteAt of 1 MiB
// inside a region with copy between Go slices.
func BenchmarkAccess1MiB(b *testing.B) {
	m, err := guestmem.New(guestmem.Layout{{GPA: 1 << 30, Size: 8 << 20}})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	if err := m.Prefault(context.Background(), guestmem.PrefaultOptions{}); err != nil {
		b.Fatal(err)
	}
	src := make([]byte, 1<<20)
	dst := make([]byte, 1<<20)
	b.Run("copy-baseline", func(b *testing.B) {
		b.SetBytes(1 << 20)
		for b.Loop() {
			copy(dst, src)
		}
	})
	b.Run("ReadAt", func(b *testing.B) {
		b.SetBytes(1 << 20)
		for b.Loop() {
			if _, err := m.ReadAt(dst, 1<<30+2<<20); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("WriteAt", func(b *testing.B) {
		b.SetBytes(1 << 20)
		for b.Loop() {
			if _, err := m.WriteAt(src, 1<<30+2<<20); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkRegionLookup256 finds the region of random addresses among 256
// regions.
func BenchmarkRegionLookup256(b *testing.B) {
	var l guestmem.Layout
	for i := 0; i < 256; i++ {
		l = append(l, guestmem.RegionSpec{GPA: guestmem.GuestAddress(i) * 8 << 20, Size: 4 << 20})
	}
	m, err := guestmem.New(l, guestmem.WithGuardGap(4096))
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	rng := rand.New(rand.NewPCG(1, 1))
	addrs := make([]guestmem.GuestAddress, 1024)
	for i := range addrs {
		addrs[i] = guestmem.GuestAddress(rng.IntN(256))*8<<20 + guestmem.GuestAddress(rng.IntN(4<<20))
	}
	i := 0
	for b.Loop() {
		if _, err := m.Region(addrs[i%len(addrs)]); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkTypedAccess measures the typed accessors; -benchmem shows they
// allocate nothing.
func BenchmarkTypedAccess(b *testing.B) {
	m, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: 2 << 20}})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	b.Run("ReadUint64", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := m.ReadUint64(4096); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("ReadUint32", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := m.ReadUint32(4096); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("WriteUint64", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := m.WriteUint64(4096, 7); err != nil {
				b.Fatal(err)
			}
		}
	})
}
