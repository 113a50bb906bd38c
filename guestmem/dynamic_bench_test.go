//go:build amd64

package guestmem_test

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

// quarterFull is a 4 GiB guest (x86 layout) with one MiB in four written
// with non-zero data: 1 GiB populated, 3 GiB never touched.
func quarterFull(b *testing.B, backing guestmem.Backing) (*guestmem.Memory, uint64) {
	return quarterFullOf(b, 4<<30, backing)
}

// quarterFullOf is quarterFull of size bytes; n is the bytes written.
func quarterFullOf(b *testing.B, size uint64, backing guestmem.Backing) (*guestmem.Memory, uint64) {
	b.Helper()
	m, err := guestmem.New(guestmem.X86Layout(size), withBacking(backing))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { m.Close() })
	chunk := bytes.Repeat([]byte{0x5a, 1, 2, 3, 4, 5, 6, 7}, mib/8)
	var n uint64
	for _, r := range m.Regions() {
		for off := uint64(0); off < r.Size; off += 4 * mib {
			if _, err := m.WriteAt(chunk, int64(r.GPA)+int64(off)); err != nil {
				b.Fatal(err)
			}
			n += mib
		}
	}
	return m, n
}

// sinks are the writers saves go to: a file in the temp directory (page
// cache), and a sink that copies into a 1 MiB buffer, as a socket would.
func sinks(b *testing.B) map[string]func() io.Writer {
	path := filepath.Join(b.TempDir(), "snap")
	return map[string]func() io.Writer{
		"file": func() io.Writer {
			f, err := os.Create(path)
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { f.Close() })
			return f
		},
		"copy": func() io.Writer { return &copySink{buf: make([]byte, mib)} },
	}
}

type copySink struct{ buf []byte }

func (s *copySink) Write(p []byte) (int, error) {
	for done := 0; done < len(p); {
		done += copy(s.buf, p[done:])
	}
	return len(p), nil
}

// BenchmarkSave4GiBQuarter saves a 4 GiB guest with a quarter populated, and
// as the baseline io.Copy's the same number of bytes from a Go buffer to the
// same writer. MB/s counts the populated bytes for both.
func BenchmarkSave4GiBQuarter(b *testing.B) {
	for _, backing := range []guestmem.Backing{guestmem.Anonymous, guestmem.Memfd} {
		m, n := quarterFull(b, backing)
		for name, sink := range sinks(b) {
			b.Run(backing.String()+"/"+name+"/Save", func(b *testing.B) {
				b.SetBytes(int64(n))
				for b.Loop() {
					w := sink()
					st, err := m.Save(context.Background(), w, guestmem.SaveOptions{})
					if err != nil {
						b.Fatal(err)
					}
					if st.DataBytes != n {
						b.Fatalf("saved %d bytes of data, want %d", st.DataBytes, n)
					}
					if f, ok := w.(*os.File); ok {
						f.Close()
					}
				}
			})
			if backing != guestmem.Anonymous {
				continue // the baseline does not depend on the backing
			}
			b.Run("baseline/"+name+"/io.Copy", func(b *testing.B) {
				src := bytes.Repeat([]byte{0x5a, 1, 2, 3, 4, 5, 6, 7}, int(n)/8)
				b.SetBytes(int64(n))
				for b.Loop() {
					w := sink()
					if _, err := io.Copy(w, bytes.NewReader(src)); err != nil {
						b.Fatal(err)
					}
					if f, ok := w.(*os.File); ok {
						f.Close()
					}
				}
			})
		}
	}
}

// BenchmarkSaveCompressed saves a 256 MiB guest (x86 layout) with one MiB
// in four written, as BenchmarkSave4GiBQuarter's, plain and compressed, to a
// copying sink. MB/s counts the populated bytes; ratio is the compressed
// stream's size over the plain one's.
func BenchmarkSaveCompressed(b *testing.B) {
	m, n := quarterFullOf(b, 256<<20, guestmem.Anonymous)
	plain, err := m.Save(context.Background(), &copySink{buf: make([]byte, mib)}, guestmem.SaveOptions{})
	if err != nil {
		b.Fatal(err)
	}
	for _, compress := range []bool{false, true} {
		name := map[bool]string{false: "plain", true: "zstd"}[compress]
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(n))
			var st guestmem.SaveStats
			for b.Loop() {
				if st, err = m.Save(context.Background(), &copySink{buf: make([]byte, mib)},
					guestmem.SaveOptions{Compress: compress}); err != nil {
					b.Fatal(err)
				}
				if st.DataBytes != n {
					b.Fatalf("saved %d bytes of data, want %d", st.DataBytes, n)
				}
			}
			b.ReportMetric(float64(st.Bytes)/float64(plain.Bytes), "ratio")
			b.ReportMetric(float64(st.Duration.Microseconds())/1000, "ms/Save")
		})
	}
}

// BenchmarkSaveProportional saves 4 GiB guests with an eighth, a quarter and
// a half populated: the time follows the populated part, not the guest size.
func BenchmarkSaveProportional(b *testing.B) {
	for _, every := range []uint64{8, 4, 2} {
		m, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: 4 << 30}})
		if err != nil {
			b.Fatal(err)
		}
		chunk := bytes.Repeat([]byte{0x5a}, mib)
		for off := uint64(0); off < 4<<30; off += every * mib {
			if _, err := m.WriteAt(chunk, int64(off)); err != nil {
				b.Fatal(err)
			}
		}
		b.Run("1/"+string(rune('0'+every)), func(b *testing.B) {
			for b.Loop() {
				if _, err := m.Save(context.Background(), &copySink{buf: make([]byte, mib)}, guestmem.SaveOptions{}); err != nil {
					b.Fatal(err)
				}
			}
		})
		m.Close()
	}
}

// BenchmarkRestore4GiBQuarter restores the quarter-populated 4 GiB guest
// from a file eagerly (read and checksum every byte) and lazily (map the
// file), and for lazy also times a guest's first instruction: RestoreLazy,
// Register, and KVM_RUN until the guest's first port write.
func BenchmarkRestore4GiBQuarter(b *testing.B) {
	m, n := quarterFull(b, guestmem.Memfd)
	path := filepath.Join(b.TempDir(), "snap")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := m.Save(context.Background(), f, guestmem.SaveOptions{}); err != nil {
		b.Fatal(err)
	}
	f.Close()
	m.Close()
	open := func(b *testing.B) *os.File {
		f, err := os.Open(path)
		if err != nil {
			b.Fatal(err)
		}
		return f
	}
	b.Run("eager", func(b *testing.B) {
		b.SetBytes(int64(n))
		for b.Loop() {
			f := open(b)
			r, err := guestmem.Restore(context.Background(), []io.Reader{f})
			if err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			r.Close()
			f.Close()
			b.StartTimer()
		}
	})
	b.Run("lazy", func(b *testing.B) {
		for b.Loop() {
			f := open(b)
			r, err := guestmem.RestoreLazy(context.Background(), []*os.File{f})
			if err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			r.Close()
			f.Close()
			b.StartTimer()
		}
	})
	b.Run("lazy-first-instruction", func(b *testing.B) {
		vm := testenv.VM(b)
		mach, err := guest.New(vm, guest.Config{})
		if err != nil {
			b.Fatal(err)
		}
		defer mach.Close()
		a := &guest.Asm{}
		a.Load(guest.RAX, guest.RSI) // read restored guest memory
		a.Out(guest.PortDone)
		a.Hlt()
		entry, err := mach.LoadAsm(a)
		if err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			f := open(b)
			r, err := guestmem.RestoreLazy(context.Background(), []*os.File{f})
			if err != nil {
				b.Fatal(err)
			}
			if err := r.Register(vm); err != nil {
				b.Fatal(err)
			}
			if _, err := mach.Call(entry, kvm.Regs{RSI: 8}, guest.Handlers{}); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			r.Close()
			f.Close()
			b.StartTimer()
		}
	})
}

// BenchmarkCollectDirty4GiB collects the dirty set of a registered 4 GiB
// guest: KVM's dirty log of both slots merged with guestmem's own bitmap.
// "quarter": one page in four dirtied by the host; "clean": none.
func BenchmarkCollectDirty4GiB(b *testing.B) {
	vm := testenv.VM(b)
	m, err := guestmem.New(guestmem.X86Layout(4 << 30))
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	if err := m.StartDirtyTracking(); err != nil {
		b.Fatal(err)
	}
	if err := m.Register(vm); err != nil {
		b.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		every uint64
	}{{"clean", 0}, {"quarter", 4}} {
		b.Run(tc.name, func(b *testing.B) {
			var pages uint64
			var spent time.Duration
			for b.Loop() {
				b.StopTimer()
				if tc.every > 0 {
					for _, r := range m.Regions() {
						for off := uint64(0); off < r.Size; off += tc.every * 4096 {
							if err := m.MarkDirty(r.GPA+guestmem.GuestAddress(off), 4096); err != nil {
								b.Fatal(err)
							}
						}
					}
				}
				b.StartTimer()
				t0 := time.Now()
				d, err := m.CollectDirty()
				spent += time.Since(t0)
				if err != nil {
					b.Fatal(err)
				}
				pages += d.Pages()
			}
			b.ReportMetric(float64(m.Size()/4096)/(spent.Seconds()/float64(b.N)), "pages-scanned/s")
			b.ReportMetric(float64(pages)/float64(b.N), "dirty-pages/op")
		})
	}
}

// BenchmarkHotplug1GiB adds and removes a 1 GiB memfd region of a guest
// registered with a VM: arena, mapping, advice and KVM slot on the way in;
// slot deletion, draining readers, unmapping and hole punching on the way
// out.
func BenchmarkHotplug1GiB(b *testing.B) {
	vm := testenv.VM(b)
	m, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: 64 * mib}}, guestmem.WithMemfd(),
		guestmem.WithHotplug(1<<30))
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	if err := m.Register(vm); err != nil {
		b.Fatal(err)
	}
	var add, remove time.Duration
	for b.Loop() {
		t0 := time.Now()
		if _, err := m.AddRegion(guestmem.RegionSpec{GPA: 4 << 30, Size: 1 << 30}); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := m.RemoveRegion(4 << 30); err != nil {
			b.Fatal(err)
		}
		add += t1.Sub(t0)
		remove += time.Since(t1)
	}
	b.ReportMetric(float64(add.Microseconds())/float64(b.N), "add-µs")
	b.ReportMetric(float64(remove.Microseconds())/float64(b.N), "remove-µs")
}

// BenchmarkRegister64GiB times Register and Unregister of a 64 GiB guest
// (x86 layout: two slots), reported apart from New (BenchmarkSetup64GiB).
func BenchmarkRegister64GiB(b *testing.B) {
	vm := testenv.VM(b)
	m, err := guestmem.New(guestmem.X86Layout(64 << 30))
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	for b.Loop() {
		if err := m.Register(vm); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if err := m.Unregister(); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// BenchmarkRestoreOnDemand4GiBQuarter restores the quarter-populated 4 GiB
// guest through userfaultfd (RestoreOnDemand) from a snapshot file, plain
// and compressed, against eager Restore and file-mapped RestoreLazy of the
// same file in the same run:
//
//   - ready: until RestoreOnDemand returns (a vCPU could run);
//   - first-access: ready, then one page read the way KVM reads (a
//     userfault served from the file);
//   - resident: until every saved page is in (the background fill), in
//     bytes of data per second, against eager's on the same backing;
//   - faults: every 1 MiB data chunk touched once by the kernel with no
//     background fill, reporting the handlers' median and p99 service time;
//   - first-instruction (KVM): RestoreOnDemand, Register, and the guest's
//     first read of restored memory;
//   - lazy-file-resident: RestoreLazy, then every data chunk read.
func BenchmarkRestoreOnDemand4GiBQuarter(b *testing.B) {
	m, n := quarterFull(b, guestmem.Memfd)
	dir := b.TempDir()
	paths := map[string]string{}
	for _, kind := range []string{"plain", "zstd"} {
		paths[kind] = filepath.Join(dir, kind)
		f, err := os.Create(paths[kind])
		if err != nil {
			b.Fatal(err)
		}
		if _, err := m.Save(context.Background(), f, guestmem.SaveOptions{Compress: kind == "zstd"}); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
	var chunks []guestmem.GuestAddress // the first page of each data chunk
	for _, r := range m.Regions() {
		for off := uint64(0); off < r.Size; off += 4 * mib {
			chunks = append(chunks, r.GPA+guestmem.GuestAddress(off))
		}
	}
	m.Close()
	open := func(b *testing.B, kind string) *os.File {
		f, err := os.Open(paths[kind])
		if err != nil {
			b.Fatal(err)
		}
		return f
	}
	ctx := context.Background()
	backings := map[string]guestmem.Option{"anon": guestmem.WithAnonymous(), "memfd": guestmem.WithMemfd()}
	restoreOn := func(b *testing.B, f *os.File, o guestmem.OnDemandOptions, backing string) (*guestmem.Memory, *guestmem.OnDemand) {
		r, od, err := guestmem.RestoreOnDemand(ctx, []io.ReaderAt{f}, o, backings[backing])
		if err != nil {
			b.Fatal(err)
		}
		return r, od
	}
	restore := func(b *testing.B, f *os.File, o guestmem.OnDemandOptions) (*guestmem.Memory, *guestmem.OnDemand) {
		return restoreOn(b, f, o, "memfd")
	}
	for _, backing := range []string{"anon", "memfd"} {
		b.Run("eager/"+backing, func(b *testing.B) {
			b.SetBytes(int64(n))
			for b.Loop() {
				f := open(b, "plain")
				r, err := guestmem.Restore(ctx, []io.Reader{f}, backings[backing])
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				r.Close()
				f.Close()
				b.StartTimer()
			}
		})
		b.Run("resident/plain/"+backing, func(b *testing.B) {
			b.SetBytes(int64(n))
			for b.Loop() {
				f := open(b, "plain")
				r, od := restoreOn(b, f, guestmem.OnDemandOptions{}, backing)
				if err := od.Wait(ctx); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				r.Close()
				f.Close()
				b.StartTimer()
			}
		})
	}
	for _, kind := range []string{"plain", "zstd"} {
		b.Run("ready/"+kind, func(b *testing.B) {
			for b.Loop() {
				f := open(b, kind)
				r, _ := restore(b, f, guestmem.OnDemandOptions{Fillers: -1})
				b.StopTimer()
				r.Close()
				f.Close()
				b.StartTimer()
			}
		})
		b.Run("first-access/"+kind, func(b *testing.B) {
			for b.Loop() {
				f := open(b, kind)
				r, _ := restore(b, f, guestmem.OnDemandOptions{Fillers: -1})
				if _, err := kernelRead(b, r, chunks[1], 8); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				r.Close()
				f.Close()
				b.StartTimer()
			}
		})
		b.Run("resident/"+kind, func(b *testing.B) {
			if kind == "plain" {
				b.Skip("measured per backing above")
			}
			b.SetBytes(int64(n))
			for b.Loop() {
				f := open(b, kind)
				r, od := restore(b, f, guestmem.OnDemandOptions{})
				if err := od.Wait(ctx); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				r.Close()
				f.Close()
				b.StartTimer()
			}
		})
		b.Run("faults/"+kind, func(b *testing.B) {
			var p50, p99 time.Duration
			for b.Loop() {
				f := open(b, kind)
				r, od := restore(b, f, guestmem.OnDemandOptions{Fillers: -1})
				for _, a := range chunks {
					if _, err := kernelRead(b, r, a, 8); err != nil {
						b.Fatal(err)
					}
				}
				b.StopTimer()
				p := od.Progress()
				p50, p99 = p.FaultP50, p.FaultP99
				r.Close()
				f.Close()
				b.StartTimer()
			}
			b.ReportMetric(float64(p50.Nanoseconds())/1e3, "p50-µs")
			b.ReportMetric(float64(p99.Nanoseconds())/1e3, "p99-µs")
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(chunks))/1e3, "µs/fault")
		})
	}
	b.Run("first-instruction", func(b *testing.B) {
		// RestoreOnDemand, Register, and KVM_RUN until the guest has read
		// restored memory (a KVM-driven userfault) and written a port.
		vm := testenv.VM(b)
		mach, err := guest.New(vm, guest.Config{})
		if err != nil {
			b.Fatal(err)
		}
		defer mach.Close()
		a := &guest.Asm{}
		a.Load(guest.RAX, guest.RSI)
		a.Out(guest.PortDone)
		a.Hlt()
		entry, err := mach.LoadAsm(a)
		if err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			f := open(b, "plain")
			r, _ := restore(b, f, guestmem.OnDemandOptions{})
			if err := r.Register(vm); err != nil {
				b.Fatal(err)
			}
			if _, err := mach.Call(entry, kvm.Regs{RSI: uint64(chunks[1])}, guest.Handlers{}); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			r.Close()
			f.Close()
			b.StartTimer()
		}
	})
	b.Run("lazy-file-resident", func(b *testing.B) {
		b.SetBytes(int64(n))
		for b.Loop() {
			f := open(b, "plain")
			r, err := guestmem.RestoreLazy(ctx, []*os.File{f})
			if err != nil {
				b.Fatal(err)
			}
			for _, a := range chunks {
				if _, err := kernelRead(b, r, a, mib); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			r.Close()
			f.Close()
			b.StartTimer()
		}
	})
}
