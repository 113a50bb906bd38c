//go:build amd64

package tests

// Integration tests of package kvm with real guest code (internal/guest)
// running on memory from package arena. Each test checks, at its end, that
// it left no file descriptor, KVM mapping, memfd mapping or arena behind
// (leakCheck).
//
// Guest programs touch one quadword per page: on hosts where KVM emulates
// every guest instruction (about a million a second) a 256 MiB fill takes
// under a second.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/internal/guest"
	"github.com/gmem-vmm/gmem/internal/procfs"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

const (
	kPage = 4096
	kMiB  = 1 << 20
	kGiB  = 1 << 30
)

// env is one VM with a guest.Machine and the standard programs loaded.
type kvmEnv struct {
	t  *testing.T
	vm *kvm.VM
	m  *guest.Machine
	// entry points of the standard programs
	fill, sum, verify, store, load uint64
}

// newEnv makes a VM and a Machine, closed at cleanup, after checking
// that nothing leaks. With manual, it turns on manual dirty-log protect
// before any slot exists.
func newKVMEnv(t *testing.T, manual bool) *kvmEnv {
	t.Helper()
	kvmLeakCheck(t)
	e := &kvmEnv{t: t, vm: testenv.VM(t)}
	if manual {
		if !e.vm.Capabilities().ManualDirtyLog {
			testenv.Skip(t, "no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
		}
		if err := e.vm.EnableManualDirtyLog(); err != nil {
			t.Fatal(err)
		}
	}
	m, err := guest.New(e.vm, guest.Config{})
	if err != nil {
		t.Fatal(err)
	}
	e.m = m
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Error(err)
		}
	})
	for _, p := range []struct {
		at  *uint64
		asm *guest.Asm
	}{
		{&e.fill, guest.FillPages()}, {&e.sum, guest.SumPages()}, {&e.verify, guest.VerifyPages()},
		{&e.store, guest.Store()}, {&e.load, guest.Load()},
	} {
		if *p.at, err = m.LoadAsm(p.asm); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

// anon maps size bytes of anonymous shared memory, unmapped at cleanup.
func (e *kvmEnv) anon(size int64) *arena.Mapping {
	e.t.Helper()
	m, err := arena.NewAnon(size)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		if err := m.Close(); err != nil {
			e.t.Error(err)
		}
	})
	return m
}

// memfd makes a memfd of size bytes, closed at cleanup.
func (e *kvmEnv) memfd(size int64) int {
	e.t.Helper()
	fd, err := unix.MemfdCreate("gmem-kvm-test", unix.MFD_CLOEXEC)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Ftruncate(fd, size); err != nil {
		e.t.Fatal(err)
	}
	return fd
}

// setSlot registers s and deletes it at cleanup, before the cleanups
// registered earlier unmap its memory: KVM lets go first.
func (e *kvmEnv) setSlot(s kvm.Slot) {
	e.t.Helper()
	if err := e.vm.SetSlot(s); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		if err := e.vm.DeleteSlot(s.ID); err != nil && !errors.Is(err, kvm.ErrNoSlot) {
			e.t.Error(err)
		}
	})
}

// freeSlot returns an unused slot number.
func (e *kvmEnv) freeSlot() uint32 {
	e.t.Helper()
	id, err := e.vm.FreeSlot()
	if err != nil {
		e.t.Fatal(err)
	}
	return id
}

// call runs the program at entry and fails the test on an error.
func (e *kvmEnv) call(entry uint64, regs kvm.Regs, h guest.Handlers) guest.Result {
	e.t.Helper()
	res, err := e.m.Call(entry, regs, h)
	if err != nil {
		e.t.Fatalf("guest program: %v", err)
	}
	return res
}

// guestLoad has the guest read the quadword at gpa; MMIO reads of it
// return zero.
func (e *kvmEnv) guestLoad(gpa uint64) (uint64, guest.Result) {
	e.t.Helper()
	res := e.call(e.load, kvm.Regs{RSI: gpa}, guest.Handlers{})
	v, ok := res.Port64(guest.PortLo, guest.PortHi)
	if !ok {
		e.t.Fatalf("load %#x reported nothing: %+v", gpa, res)
	}
	return v, res
}

// guestStore has the guest write v to the quadword at gpa.
func (e *kvmEnv) guestStore(gpa, v uint64) guest.Result {
	e.t.Helper()
	return e.call(e.store, kvm.Regs{RSI: gpa, RDX: v}, guest.Handlers{})
}

// leakCheck records the process's open fds and the mappings this test
// could leave behind (KVM run pages, memfd and shared memory mappings, any
// mapping with MADV_DONTDUMP, which package arena sets on all of its own
// and the Go runtime on none), and checks at cleanup, after every other
// cleanup, that they are as they were.
func kvmLeakCheck(t *testing.T) {
	t.Helper()
	fds, maps := fdTable(t), moduleMappings(t)
	t.Cleanup(func() {
		if got := fdTable(t); !slices.Equal(got, fds) {
			t.Errorf("file descriptors leaked:\nbefore %q\nafter  %q", fds, got)
		}
		if got := moduleMappings(t); !slices.Equal(got, maps) {
			t.Errorf("mappings leaked:\nbefore %q\nafter  %q", maps, got)
		}
	})
}

// fdTable lists "fd -> target" for the process's open fds, sorted.
func fdTable(t testing.TB) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil {
			continue // the fd ReadDir itself used
		}
		out = append(out, e.Name()+" -> "+target)
	}
	slices.Sort(out)
	return out
}

// moduleMappings lists, from /proc/self/smaps, the VMAs that only this
// module's code makes: KVM run pages (anon_inode:kvm-vcpu), memfd and
// shared mappings, and MADV_DONTDUMP ("dd") mappings, each as its maps line.
func moduleMappings(t testing.TB) []string {
	t.Helper()
	vmas, err := procfs.Smaps()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, v := range vmas {
		if strings.Contains(v.Path, "kvm") || strings.Contains(v.Path, "memfd:") ||
			strings.HasSuffix(v.Perms, "s") || v.HasFlag("dd") {
			out = append(out, fmt.Sprintf("%x-%x %s %08x %s %d %s", v.Start, v.End, v.Perms, v.Offset, v.Dev, v.Inode, v.Path))
		}
	}
	return out
}

// TestGuestFillsMemfd: the guest writes a distinct value into every page
// of a 256 MiB slot backed by a memfd mapped with arena.NewFromFD; the host
// reads each back through the mapping and through the memfd.
func TestGuestFillsMemfd(t *testing.T) {
	e := newKVMEnv(t, false)
	const size, base, seed = 256 * kMiB, 4 * kGiB, 0x5eed_0000_0000_5eed
	fd := e.memfd(size)
	ram, err := arena.NewFromFD(fd, 0, size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ram.Close() })
	e.setSlot(kvm.Slot{ID: e.freeSlot(), GPA: base, Size: size, HostAddr: ram.Addr()})

	start := time.Now()
	res := e.call(e.fill, kvm.Regs{RSI: base, RDI: base + size, RDX: seed, RBX: kPage}, guest.Handlers{})
	t.Logf("guest filled %d pages in %v (%d exits)", size/kPage, time.Since(start), res.Exits)
	if _, ok := res.Port(guest.PortDone); !ok {
		t.Fatalf("fill did not finish: %+v", res)
	}

	for off := int64(0); off < size; off += kPage {
		v, err := ram.ReadUint64(off)
		if err != nil {
			t.Fatal(err)
		}
		if want := guest.Pattern(base+uint64(off), seed); v != want {
			t.Fatalf("mapping offset %#x: %#x, want %#x", off, v, want)
		}
	}
	buf := make([]byte, kMiB)
	for off := int64(0); off < size; off += kMiB {
		if n, err := unix.Pread(fd, buf, off); err != nil || n != len(buf) {
			t.Fatalf("pread at %#x: %d, %v", off, n, err)
		}
		for p := 0; p < kMiB; p += kPage {
			want := guest.Pattern(base+uint64(off)+uint64(p), seed)
			if v := binary.LittleEndian.Uint64(buf[p:]); v != want {
				t.Fatalf("memfd offset %#x: %#x, want %#x", off+int64(p), v, want)
			}
			// The guest wrote the first quadword of each page and nothing else.
			if v := binary.LittleEndian.Uint64(buf[p+8:]); v != 0 {
				t.Fatalf("memfd offset %#x: %#x, want 0", off+int64(p)+8, v)
			}
		}
	}
}

// TestGuestChecksumsHostData: the host writes data; the guest sums it and
// reports the sum on I/O ports. Then the guest verifies a pattern the host
// wrote and finds the one page the host spoiled.
func TestGuestChecksumsHostData(t *testing.T) {
	e := newKVMEnv(t, false)
	const size, base = 64 * kMiB, kGiB
	ram := e.anon(size)
	e.setSlot(kvm.Slot{ID: e.freeSlot(), GPA: base, Size: size, HostAddr: ram.Addr()})

	rng := rand.New(rand.NewPCG(1, 2))
	var want uint64
	for off := int64(0); off < size; off += kPage {
		v := rng.Uint64()
		want += v
		if err := ram.WriteUint64(off, v); err != nil {
			t.Fatal(err)
		}
	}
	res := e.call(e.sum, kvm.Regs{RSI: base, RDI: base + size, RBX: kPage}, guest.Handlers{})
	if got, ok := res.Port64(guest.PortLo, guest.PortHi); !ok || got != want {
		t.Fatalf("guest sum %#x (reported %v), host sum %#x", got, ok, want)
	}

	const seed = 0xfeed
	for off := int64(0); off < size; off += kPage {
		if err := ram.WriteUint64(off, guest.Pattern(base+uint64(off), seed)); err != nil {
			t.Fatal(err)
		}
	}
	res = e.call(e.verify, kvm.Regs{RSI: base, RDI: base + size, RDX: seed, RBX: kPage}, guest.Handlers{})
	if _, failed := res.Port(guest.PortFail); failed {
		t.Fatalf("guest found a mismatch in correct data: %+v", res.Outs)
	}
	const spoiled = 5*kMiB + 3*kPage
	if err := ram.WriteUint64(spoiled, 1); err != nil {
		t.Fatal(err)
	}
	res = e.call(e.verify, kvm.Regs{RSI: base, RDI: base + size, RDX: seed, RBX: kPage}, guest.Handlers{})
	at, _ := res.Port64(guest.PortLo, guest.PortHi)
	if _, failed := res.Port(guest.PortFail); !failed || at != base+spoiled {
		t.Fatalf("guest should report the spoiled page %#x: outs %+v", base+spoiled, res.Outs)
	}
}

// TestMMIOGap: guest accesses between two slots exit to the VMM as MMIO,
// with the address, size and data; accesses inside the slots do not.
func TestMMIOGap(t *testing.T) {
	e := newKVMEnv(t, false)
	ram := e.anon(4 * kMiB)
	const lo, hi = kGiB, kGiB + 4*kMiB // slots [lo, lo+2M) and [hi, hi+2M); the gap is [lo+2M, hi)
	e.setSlot(kvm.Slot{ID: e.freeSlot(), GPA: lo, Size: 2 * kMiB, HostAddr: ram.Addr()})
	e.setSlot(kvm.Slot{ID: e.freeSlot(), GPA: hi, Size: 2 * kMiB, HostAddr: ram.Addr() + 2*kMiB})

	for _, c := range []struct {
		gpa  uint64
		mmio bool
	}{
		{lo + 2*kMiB, true}, {lo + 3*kMiB + 0x238, true}, {hi - 8, true}, {lo - 8, true}, {hi + 2*kMiB, true},
		{lo, false}, {lo + 2*kMiB - 8, false}, {hi, false}, {hi + 2*kMiB - 8, false},
	} {
		v := 0x1122_3344_5566_7700 | c.gpa&0xff
		res := e.guestStore(c.gpa, v)
		if !c.mmio {
			if len(res.MMIO) != 0 {
				t.Errorf("store to slot memory at %#x exited as MMIO: %+v", c.gpa, res.MMIO)
			}
			continue
		}
		if len(res.MMIO) != 1 {
			t.Fatalf("store to %#x: %d MMIO exits, want 1", c.gpa, len(res.MMIO))
		}
		m := res.MMIO[0]
		if m.Addr != c.gpa || !m.Write || m.Len != 8 || m.Value() != v ||
			binary.LittleEndian.Uint64(m.Data) != v {
			t.Errorf("store %#x to %#x: MMIO exit %+v", v, c.gpa, m)
		}
	}
	// A read from the gap is answered by the VMM.
	const answer uint64 = 0xabad_cafe_f00d_0001
	gap := uint64(lo + 2*kMiB + 0x100)
	res := e.call(e.load, kvm.Regs{RSI: gap}, guest.Handlers{MMIO: func(m *kvm.MMIOExit) error {
		if m.Write || m.Addr != gap || m.Len != 8 {
			return fmt.Errorf("unexpected MMIO exit %+v", *m)
		}
		binary.LittleEndian.PutUint64(m.Data, answer)
		return nil
	}})
	if got, _ := res.Port64(guest.PortLo, guest.PortHi); got != answer {
		t.Fatalf("guest read %#x from the gap, the VMM answered %#x", got, answer)
	}
	// The stores inside the slots reached host memory.
	if v, _ := ram.ReadUint64(0); v != 0x1122_3344_5566_7700 {
		t.Errorf("host sees %#x at the first slot's start", v)
	}
}

// TestReadOnlySlot: the guest reads a read-only slot; a guest write to it
// is an MMIO exit (not an error) and leaves the memory unchanged. Making
// the slot writable again (SetSlot recreates it) lets writes through.
func TestReadOnlySlot(t *testing.T) {
	e := newKVMEnv(t, false)
	if !e.vm.Capabilities().ReadonlyMem {
		testenv.Skip(t, "no KVM_CAP_READONLY_MEM")
	}
	const size, base, seed = 2 * kMiB, 2 * kGiB, 0x0123
	ram := e.anon(size)
	for off := int64(0); off < size; off += kPage {
		if err := ram.WriteUint64(off, guest.Pattern(base+uint64(off), seed)); err != nil {
			t.Fatal(err)
		}
	}
	s := kvm.Slot{ID: e.freeSlot(), GPA: base, Size: size, HostAddr: ram.Addr(), Flags: kvm.ReadOnly}
	e.setSlot(s)
	res := e.call(e.verify, kvm.Regs{RSI: base, RDI: base + size, RDX: seed, RBX: kPage}, guest.Handlers{})
	if _, failed := res.Port(guest.PortFail); failed || len(res.MMIO) != 0 {
		t.Fatalf("guest reads of a read-only slot: outs %+v, MMIO %+v", res.Outs, res.MMIO)
	}

	const off, v = kPage + 16, 0xdead_beef_0bad_f00d
	res = e.guestStore(base+off, v)
	if len(res.MMIO) != 1 || res.MMIO[0].Addr != base+off || !res.MMIO[0].Write || res.MMIO[0].Value() != v {
		t.Fatalf("guest write to a read-only slot: MMIO %+v, want one write exit at %#x", res.MMIO, base+off)
	}
	if got, _ := ram.ReadUint64(off); got != 0 {
		t.Fatalf("read-only memory changed to %#x", got)
	}
	if got, _ := ram.ReadUint64(kPage); got != guest.Pattern(base+kPage, seed) {
		t.Fatalf("read-only memory changed to %#x", got)
	}

	s.Flags = 0
	if err := e.vm.SetSlot(s); err != nil {
		t.Fatalf("making the slot writable: %v", err)
	}
	if res := e.guestStore(base+off, v); len(res.MMIO) != 0 {
		t.Fatalf("write to the now writable slot exited as MMIO: %+v", res.MMIO)
	}
	if got, _ := ram.ReadUint64(off); got != v {
		t.Fatalf("write did not reach memory: %#x", got)
	}
}

// dirtyPages lists the pages whose bits are set in bitmap.
func dirtyPagesOf(bitmap []uint64) []uint64 {
	var out []uint64
	for w, bits := range bitmap {
		for b := uint64(0); b < 64; b++ {
			if bits&(1<<b) != 0 {
				out = append(out, uint64(w)*64+b)
			}
		}
	}
	return out
}

// dirtyLogEnv is a VM with one dirty-logged 64 MiB slot.
type dirtyLogVM struct {
	*kvmEnv
	ram   *arena.Mapping
	slot  uint32
	base  uint64
	pages uint64
}

func newDirtyLogVM(t *testing.T, manual bool) *dirtyLogVM {
	e := newKVMEnv(t, manual)
	const size, base = 64 * kMiB, 8 * kGiB
	d := &dirtyLogVM{kvmEnv: e, ram: e.anon(size), slot: e.freeSlot(), base: base, pages: size / kPage}
	e.setSlot(kvm.Slot{ID: d.slot, GPA: base, Size: size, HostAddr: d.ram.Addr(), Flags: kvm.LogDirtyPages})
	return d
}

// writePages has the guest write to each of pages.
func (d *dirtyLogVM) writePages(pages ...uint64) {
	d.t.Helper()
	for _, p := range pages {
		d.guestStore(d.base+p*kPage+8, p)
	}
}

// log returns the dirty pages GetDirtyLog reports.
func (d *dirtyLogVM) log() []uint64 {
	d.t.Helper()
	bm := make([]uint64, kvm.DirtyBitmapWords(d.pages))
	if err := d.vm.GetDirtyLog(d.slot, bm); err != nil {
		d.t.Fatal(err)
	}
	return dirtyPagesOf(bm)
}

func (d *dirtyLogVM) wantLog(what string, want []uint64) {
	d.t.Helper()
	if got := d.log(); !slices.Equal(got, want) {
		d.t.Fatalf("%s: dirty pages %v, want %v", what, got, want)
	}
}

// TestDirtyLog: GetDirtyLog reports exactly the pages the guest wrote,
// and (without manual protect) resets the log, so the next call reports
// only the pages written since. Guest reads of pages KVM has mapped, and
// host writes, are not logged. (A read of a page KVM has not mapped yet may
// be: KVM on Linux 7.2 with nested paging logged untouched pages the guest
// read; so the guest reads every page once first.) The
// page tables the guest CPU updates are in the Machine's own slot, so they
// add nothing.
func TestDirtyLog(t *testing.T) {
	d := newDirtyLogVM(t, false)
	// Slot memory starts clean.
	d.wantLog("fresh slot", nil)
	d.call(d.sum, kvm.Regs{RSI: d.base, RDI: d.base + d.pages*kPage, RBX: kPage}, guest.Handlers{})
	d.log() // what the first reads mapped writable, if anything

	// The guest fills every 7th page from page 3.
	const first, stride = 3, 7
	d.call(d.fill, kvm.Regs{RSI: d.base + first*kPage, RDI: d.base + d.pages*kPage, RDX: 1, RBX: stride * kPage},
		guest.Handlers{})
	var want []uint64
	for p := uint64(first); p < d.pages; p += stride {
		want = append(want, p)
	}
	d.wantLog("after the fill", want)

	// Only what was written since.
	d.writePages(0, 5, 64, 3, d.pages-1)
	d.wantLog("after five stores", []uint64{0, 3, 5, 64, d.pages - 1})
	d.wantLog("with no writes since", nil)

	// Guest reads and host writes do not dirty pages.
	d.call(d.sum, kvm.Regs{RSI: d.base, RDI: d.base + d.pages*kPage, RBX: kPage}, guest.Handlers{})
	if err := d.ram.WriteUint64(100*kPage, 1); err != nil {
		t.Fatal(err)
	}
	d.wantLog("after guest reads and a host write", nil)
}

// TestDirtyLogManualProtect: with manual protect, GetDirtyLog does not
// reset the log; ClearDirtyLog resets (and re-protects) the pages given,
// and only those.
func TestDirtyLogManualProtect(t *testing.T) {
	d := newDirtyLogVM(t, true)
	d.wantLog("fresh slot", nil)
	written := []uint64{1, 2, 63, 64, 200, 4095, d.pages - 1}
	d.writePages(written...)
	d.wantLog("after the writes", written)
	d.wantLog("read again (not reset)", written)

	// Clear the first 64-page block only.
	bm := make([]uint64, kvm.DirtyBitmapWords(d.pages))
	if err := d.vm.GetDirtyLog(d.slot, bm); err != nil {
		t.Fatal(err)
	}
	if err := d.vm.ClearDirtyLog(d.slot, 0, 64, bm[:1]); err != nil {
		t.Fatal(err)
	}
	d.wantLog("after clearing pages 0-63", written[3:])

	// Clear a bit that is not set, and one that is, in another block:
	// only the set bit's page is affected.
	one := []uint64{1<<(200%64) | 1<<(201%64)}
	if err := d.vm.ClearDirtyLog(d.slot, 192, 64, one); err != nil {
		t.Fatal(err)
	}
	d.wantLog("after clearing page 200", []uint64{64, 4095, d.pages - 1})

	// Clear the rest; the pages are protected again, so new writes show.
	if err := d.vm.GetDirtyLog(d.slot, bm); err != nil {
		t.Fatal(err)
	}
	if err := d.vm.ClearDirtyLog(d.slot, 0, d.pages, bm); err != nil {
		t.Fatal(err)
	}
	d.wantLog("after clearing everything", nil)
	d.writePages(2, 200, 9000)
	d.wantLog("after writing again", []uint64{2, 200, 9000})
}

// TestSlotMoveSeenByGuest: deleting a slot and adding it at another guest
// address, or moving it in place with SetSlot, moves what the guest sees.
func TestSlotMoveSeenByGuest(t *testing.T) {
	e := newKVMEnv(t, false)
	ram := e.anon(2 * kMiB)
	const off, v = 0x3008, 0x5151_5151_0000_0001
	if err := ram.WriteUint64(off, v); err != nil {
		t.Fatal(err)
	}
	s := kvm.Slot{ID: e.freeSlot(), GPA: kGiB, Size: 2 * kMiB, HostAddr: ram.Addr()}
	e.setSlot(s)
	if got, _ := e.guestLoad(kGiB + off); got != v {
		t.Fatalf("guest reads %#x at the first address, want %#x", got, v)
	}

	// Delete and re-add elsewhere.
	if err := e.vm.DeleteSlot(s.ID); err != nil {
		t.Fatal(err)
	}
	s.GPA = 3 * kGiB
	if err := e.vm.SetSlot(s); err != nil {
		t.Fatal(err)
	}
	if got, _ := e.guestLoad(3*kGiB + off); got != v {
		t.Fatalf("guest reads %#x at the new address, want %#x", got, v)
	}
	if got, res := e.guestLoad(kGiB + off); got != 0 || len(res.MMIO) != 1 || res.MMIO[0].Addr != kGiB+off {
		t.Fatalf("the old address should be MMIO now: read %#x, MMIO %+v", got, res.MMIO)
	}

	// Move in place (KVM_MR_MOVE): same slot, size and host memory.
	s.GPA = 5 * kGiB
	if err := e.vm.SetSlot(s); err != nil {
		t.Fatal(err)
	}
	if got, _ := e.guestLoad(5*kGiB + off); got != v {
		t.Fatalf("guest reads %#x after the move, want %#x", got, v)
	}
	if _, res := e.guestLoad(3*kGiB + off); len(res.MMIO) != 1 {
		t.Fatalf("the address before the move should be MMIO now: %+v", res.MMIO)
	}
	// And writes through the new address reach the same host memory.
	e.guestStore(5*kGiB+off+8, v+1)
	if got, _ := ram.ReadUint64(off + 8); got != v+1 {
		t.Fatalf("host sees %#x, want %#x", got, v+1)
	}
}

// TestSlotLimit fills every slot the kernel offers (all aliasing one page
// of host memory at different guest addresses); one more is ErrSlotLimit,
// from the table, not an errno from the kernel.
func TestSlotLimit(t *testing.T) {
	e := newKVMEnv(t, false) // the Machine's system slot takes one
	ram := e.anon(kPage)
	const v = 0x7777_0000_1234_5678
	if err := ram.WriteUint64(0, v); err != nil {
		t.Fatal(err)
	}
	max := e.vm.MaxSlots()
	const base = kGiB
	gpa := func(id int) uint64 { return base + uint64(id)*kPage }
	var ids []uint32
	t.Cleanup(func() {
		for _, id := range ids {
			if err := e.vm.DeleteSlot(id); err != nil {
				t.Error(err)
				return
			}
		}
	})
	start := time.Now()
	for id := 0; id < max; id++ {
		if uint32(id) == e.m.Slot() {
			continue
		}
		if err := e.vm.SetSlot(kvm.Slot{ID: uint32(id), GPA: gpa(id), Size: kPage, HostAddr: ram.Addr()}); err != nil {
			t.Fatalf("slot %d of %d: %v", id, max, err)
		}
		ids = append(ids, uint32(id))
	}
	t.Logf("%d slots registered in %v", len(ids)+1, time.Since(start))
	if n := len(e.vm.Slots()); n != max {
		t.Fatalf("%d slots in the table, want %d", n, max)
	}

	if id, err := e.vm.FreeSlot(); !errors.Is(err, kvm.ErrSlotLimit) {
		t.Errorf("FreeSlot with every slot used = %d, %v; want ErrSlotLimit", id, err)
	}
	err := e.vm.SetSlot(kvm.Slot{ID: uint32(max), GPA: gpa(max), Size: kPage, HostAddr: ram.Addr()})
	var se *kvm.SlotError
	var errno *os.SyscallError
	if !errors.Is(err, kvm.ErrSlotLimit) || !errors.As(err, &se) || errors.As(err, &errno) {
		t.Fatalf("slot %d: %v; want a *SlotError wrapping ErrSlotLimit and no errno", max, err)
	}
	t.Log(err)

	// Every slot is real: the guest sees the one host page through the
	// first, a middle and the last.
	for _, id := range []int{1, max / 2, max - 1} {
		if got, _ := e.guestLoad(gpa(id) + 0); got != v {
			t.Fatalf("guest reads %#x through slot %d, want %#x", got, id, v)
		}
	}

	start = time.Now()
	for len(ids) > 0 {
		if err := e.vm.DeleteSlot(ids[len(ids)-1]); err != nil {
			t.Fatal(err)
		}
		ids = ids[:len(ids)-1]
	}
	t.Logf("deleted in %v", time.Since(start))
	if s := e.vm.Slots(); len(s) != 1 || s[0].ID != e.m.Slot() {
		t.Fatalf("after deleting, slots %+v; want only the system slot", s)
	}
}

// TestArenaAsOneSlot registers a whole arena.Arena as one slot, as crosvm
// does for device shared memory. Mappings added to the arena later are
// seen by the guest without any KVM call; after RemoveMapping the guest
// reads zeros (read-only reservation) or gets a memory fault naming the
// guest address (PROT_NONE reservation).
func TestArenaAsOneSlot(t *testing.T) {
	for _, ro := range []bool{true, false} {
		name := "PROT_NONE reservation"
		var opts []arena.ArenaOption
		if ro {
			name = "read-only reservation"
			opts = append(opts, arena.ReadOnlyReservation())
		}
		t.Run(name, func(t *testing.T) { testArenaAsOneSlot(t, opts, ro) })
	}
}

func testArenaAsOneSlot(t *testing.T, opts []arena.ArenaOption, ro bool) {
	e := newKVMEnv(t, false)
	const size, base = 64 * kMiB, 16 * kGiB
	a, err := arena.New(size, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	slot := kvm.Slot{ID: e.freeSlot(), GPA: base, Size: size, HostAddr: a.Addr()}
	e.setSlot(slot)
	table := e.vm.Slots()

	// reserved checks what the guest gets from reserved arena memory.
	reserved := func(what string, gpa uint64) {
		t.Helper()
		res, err := e.m.Call(e.load, kvm.Regs{RSI: gpa}, guest.Handlers{})
		if ro {
			v, _ := res.Port64(guest.PortLo, guest.PortHi)
			if err != nil || v != 0 || len(res.MMIO) != 0 {
				t.Fatalf("%s: guest read %#x (MMIO %+v, err %v); want zeros", what, v, res.MMIO, err)
			}
		} else {
			wantMemoryFault(t, what, err, gpa, slot.ID, false)
		}
		// A write is a fault with either reservation: the host memory is
		// not writable.
		_, err = e.m.Call(e.store, kvm.Regs{RSI: gpa, RDX: 1}, guest.Handlers{})
		wantMemoryFault(t, what+", write", err, gpa, slot.ID, true)
	}
	reserved("before any mapping", base+8*kMiB+kPage)

	// Map a memfd into the arena; the guest sees it with no KVM call.
	const fdSize, at = 4 * kMiB, 8 * kMiB
	fd := e.memfd(fdSize)
	const v = 0x00c0_ffee_0000_0042
	if _, err := unix.Pwrite(fd, binary.LittleEndian.AppendUint64(nil, v), kPage); err != nil {
		t.Fatal(err)
	}
	if err := a.AddFDMapping(at, fdSize, fd, 0, arena.ProtReadWrite); err != nil {
		t.Fatal(err)
	}
	if got, _ := e.guestLoad(base + at + kPage); got != v {
		t.Fatalf("guest reads %#x from the new mapping, want %#x", got, v)
	}
	e.guestStore(base+at+2*kPage, v+1)
	buf := make([]byte, 8)
	if _, err := unix.Pread(fd, buf, 2*kPage); err != nil || binary.LittleEndian.Uint64(buf) != v+1 {
		t.Fatalf("memfd has %#x after the guest's write (%v), want %#x", binary.LittleEndian.Uint64(buf), err, v+1)
	}

	// Remove it: back to the reservation, still without KVM.
	if err := a.RemoveMapping(at, fdSize); err != nil {
		t.Fatal(err)
	}
	reserved("after RemoveMapping", base+at+kPage)
	if _, err := unix.Pread(fd, buf, kPage); err != nil || binary.LittleEndian.Uint64(buf) != v {
		t.Fatalf("the memfd lost its data when unmapped: %#x, %v", binary.LittleEndian.Uint64(buf), err)
	}

	// And map it again somewhere else in the arena.
	if err := a.AddFDMapping(2*at, fdSize, fd, 0, arena.ProtReadWrite); err != nil {
		t.Fatal(err)
	}
	if got, _ := e.guestLoad(base + 2*at + kPage); got != v {
		t.Fatalf("guest reads %#x from the mapping's new place, want %#x", got, v)
	}
	if got := e.vm.Slots(); !slices.Equal(got, table) {
		t.Fatalf("the slot table changed: %+v, was %+v", got, table)
	}
}

// wantFault checks that err is the guest memory fault of an access to gpa
// in slot.
func wantMemoryFault(t *testing.T, what string, err error, gpa uint64, slot uint32, write bool) {
	t.Helper()
	var mf *kvm.MemoryFaultError
	if !errors.Is(err, kvm.ErrMemoryFault) || !errors.As(err, &mf) {
		t.Fatalf("%s: err = %v; want a *kvm.MemoryFaultError", what, err)
	}
	if !mf.Known {
		// KVM_RUN failed with EFAULT and this kernel did not say where.
		t.Logf("%s: the kernel did not report the guest address: %v", what, err)
		return
	}
	if gpa < mf.GPA || gpa >= mf.GPA+max(mf.Size, 1) {
		t.Fatalf("%s: fault at %#x (+%#x), want one covering %#x: %v", what, mf.GPA, mf.Size, gpa, err)
	}
	if mf.MMIO && (mf.Slot != slot || mf.Write != write) {
		t.Fatalf("%s: %+v, want slot %d, write %v", what, *mf, slot, write)
	}
	if !strings.Contains(err.Error(), fmt.Sprintf("%#x", mf.GPA)) {
		t.Fatalf("%s: the error does not name the guest address: %v", what, err)
	}
}

// TestDeleteSlotThenUnmap: after DeleteSlot, KVM no longer uses the host
// memory, so it may be unmapped; a guest access there is then an ordinary
// MMIO exit, not a fault and not a crash. The slot is gone from the table.
func TestDeleteSlotThenUnmap(t *testing.T) {
	e := newKVMEnv(t, false)
	ram, err := arena.NewAnon(2 * kMiB)
	if err != nil {
		t.Fatal(err)
	}
	defer ram.Close()
	const base, off, v = 32 * kGiB, 0x1000, 0x0a0b_0c0d
	if err := ram.WriteUint64(off, v); err != nil {
		t.Fatal(err)
	}
	s := kvm.Slot{ID: e.freeSlot(), GPA: base, Size: 2 * kMiB, HostAddr: ram.Addr(), Flags: kvm.LogDirtyPages}
	if err := e.vm.SetSlot(s); err != nil {
		t.Fatal(err)
	}
	if got, _ := e.guestLoad(base + off); got != v {
		t.Fatalf("guest reads %#x, want %#x", got, v)
	}

	if err := e.vm.DeleteSlot(s.ID); err != nil {
		t.Fatal(err)
	}
	if err := ram.Close(); err != nil {
		t.Fatal(err)
	}
	got, res := e.guestLoad(base + off)
	if got != 0 || len(res.MMIO) != 1 || res.MMIO[0].Addr != base+off || res.MMIO[0].Write {
		t.Fatalf("read of the deleted slot: %#x, MMIO %+v; want one MMIO read exit", got, res.MMIO)
	}
	res = e.guestStore(base+off, 1)
	if len(res.MMIO) != 1 || !res.MMIO[0].Write || res.MMIO[0].Addr != base+off {
		t.Fatalf("write to the deleted slot: MMIO %+v; want one MMIO write exit", res.MMIO)
	}

	var se *kvm.SlotError
	if err := e.vm.DeleteSlot(s.ID); !errors.Is(err, kvm.ErrNoSlot) || !errors.As(err, &se) {
		t.Fatalf("second DeleteSlot: %v, want ErrNoSlot", err)
	}
	if err := e.vm.GetDirtyLog(s.ID, make([]uint64, 8)); !errors.Is(err, kvm.ErrNoSlot) {
		t.Fatalf("GetDirtyLog of the deleted slot: %v, want ErrNoSlot", err)
	}
	if _, ok := e.vm.SlotAt(base + off); ok {
		t.Fatal("SlotAt still finds the deleted slot")
	}
}
