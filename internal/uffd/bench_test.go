//go:build linux

package uffd

import (
	"runtime"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkFaultLatency times the service of one fault, as the faulting
// thread sees it: from its access to a missing 4 KiB page until the access
// completes, with one Serve loop copying the page from a source buffer. It
// reports the median and 99th percentile over every fault of the run
// (faultsPerOp per iteration), and ns/op as the mean per fault.
func BenchmarkFaultLatency(b *testing.B) {
	const faultsPerOp = 512
	for _, bk := range backings[:2] {
		b.Run(bk.name, func(b *testing.B) {
			mem := bk.mmap(b, faultsPerOp*page)
			u := open(b, Config{Required: bk.need, Fallback: Poison})
			if _, err := u.Register(addrOf(mem), uintptr(len(mem))); err != nil {
				b.Fatal(err)
			}
			src := source(page, page, 1)
			stop := serve(b, u, 1, func(ev Event) error {
				_, err := u.Copy(ev.Page, src, WakeWaiters)
				return err
			})
			advice := unix.MADV_DONTNEED // no Remove events asked for: returns at once
			if bk.name == "memfd" {
				advice = unix.MADV_REMOVE
			}

			lat := make([]time.Duration, 0, b.N*faultsPerOp)
			work, done := make(chan struct{}), make(chan []time.Duration)
			go func() { // the faulting thread
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				buf := make([]time.Duration, faultsPerOp)
				for range work {
					for p := range faultsPerOp {
						t0 := time.Now()
						_ = load(&mem[p*page])
						buf[p] = time.Since(t0)
					}
					done <- buf
				}
			}()
			b.ResetTimer()
			for range b.N {
				work <- struct{}{}
				lat = append(lat, <-done...)
				b.StopTimer()
				if err := unix.Madvise(mem, advice); err != nil { // missing again
					b.Fatal(err)
				}
				b.StartTimer()
			}
			b.StopTimer()
			close(work)
			if errs := stop(); len(errs) > 0 {
				b.Fatal(errs)
			}
			if err := u.Unregister(addrOf(mem), uintptr(len(mem))); err != nil {
				b.Fatal(err)
			}
			reportLatency(b, lat)
		})
	}
}

func reportLatency(b *testing.B, lat []time.Duration) {
	slices.Sort(lat)
	var sum time.Duration
	for _, d := range lat {
		sum += d
	}
	b.ReportMetric(float64(sum.Nanoseconds())/float64(len(lat)), "ns/op")
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds()), "p50-ns/fault")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds()), "p99-ns/fault")
	b.ReportMetric(float64(len(lat)), "faults")
}

// BenchmarkCopy2MiB times UFFDIO_COPY of 2 MiB batches into registered
// memory that nobody is waiting on (a prefetcher filling the rest of a
// snapshot), in GiB/s.
func BenchmarkCopy2MiB(b *testing.B) {
	const batch = 2 << 20
	for _, bk := range backings {
		b.Run(bk.name, func(b *testing.B) {
			const region = 32 << 20
			mem := bk.mmap(b, region)
			u := open(b, Config{Required: bk.need, Fallback: Poison})
			if _, err := u.Register(addrOf(mem), region); err != nil {
				b.Fatal(err)
			}
			src := source(batch, page, 2)
			advice := unix.MADV_DONTNEED
			if bk.name != "anon" {
				advice = unix.MADV_REMOVE
			}
			b.SetBytes(batch)
			b.ResetTimer()
			start := time.Now()
			var paused time.Duration
			off := 0
			for range b.N {
				if off == region {
					p0 := time.Now()
					b.StopTimer()
					if err := unix.Madvise(mem, advice); err != nil {
						b.Fatal(err)
					}
					off = 0
					b.StartTimer()
					paused += time.Since(p0)
				}
				if _, err := u.Copy(addrOf(mem)+uintptr(off), src, DontWake); err != nil {
					b.Fatal(err)
				}
				off += batch
			}
			elapsed := time.Since(start) - paused
			b.StopTimer()
			b.ReportMetric(float64(b.N)*batch/(1<<30)/elapsed.Seconds(), "GiB/s")
			if err := u.Unregister(addrOf(mem), region); err != nil {
				b.Fatal(err)
			}
		})
	}
}
