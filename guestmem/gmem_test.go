package guestmem_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

// gmemVM returns a VM whose guest_memfd the host can map (Linux 6.18), or
// skips (fails under GMEM_REQUIRE_KVM=1).
func gmemVM(t testing.TB) *kvm.VM {
	t.Helper()
	vm := testenv.VM(t)
	const want = kvm.GuestMemfdMmap | kvm.GuestMemfdInitShared
	if f, err := vm.GuestMemfdFlags(); err != nil || f&want != want {
		testenv.Skip(t, "guest_memfd cannot be mapped by the host here (flags %v, %v): Linux 6.18 needed", f, err)
	}
	return vm
}

const page = 4096

var gmemLayout = guestmem.Layout{{GPA: 0, Size: 8 * mib}, {GPA: 16 * mib, Size: 8 * mib}}

// residentPages counts the pages of region r that mincore reports resident.
func residentPages(t testing.TB, m *guestmem.Memory, r guestmem.Region) int {
	t.Helper()
	return testenv.ResidentPages(t, r.HostAddr, r.Size)
}

// New on a VM makes one kvm-gmem file, mapped shared (smaps), sized for the
// layout and the hotplug space; Close leaves no fd behind.
func TestGuestMemfdNew(t *testing.T) {
	vm := gmemVM(t)
	fds := testenv.OpenFDs(t)
	m, err := guestmem.New(gmemLayout, guestmem.WithGuestMemfd(vm), guestmem.WithHotplug(32*mib))
	require.NoError(t, err)
	require.Equal(t, guestmem.GuestMemfd, m.Backing())
	require.Equal(t, "guest_memfd", m.Backing().String())
	g := m.GuestMemfd()
	require.NotNil(t, g)
	require.Equal(t, m.FD(), g.FD())
	require.Equal(t, vm, g.VM())
	require.Equal(t, uint64(16*mib+32*mib), g.Size(), "the layout at 2 MiB-aligned offsets and the hotplug space")
	for i, r := range m.Regions() {
		require.Equal(t, int64(i)*8*mib, r.FDOffset)
		v, ok := testenv.VMAAt(t, r.HostAddr)
		require.True(t, ok)
		require.Contains(t, v.Path, "kvm-gmem", "smaps names the guest_memfd")
		require.True(t, strings.HasSuffix(v.Perms, "s"), "mapped shared: %s", v.Perms)
		require.False(t, v.HasFlag("hg"), "no THP advice on guest_memfd")
	}
	// The guest_memfd is read and written through the mapping.
	require.NoError(t, m.WriteUint64(16*mib+8, 0xfeed))
	got, err := m.ReadUint64(16*mib + 8)
	require.NoError(t, err)
	require.Equal(t, uint64(0xfeed), got)
	require.NoError(t, m.Close())
	require.Equal(t, -1, m.FD())
	require.Equal(t, fds, testenv.OpenFDs(t), "the guest_memfd is closed")
}

// What guest_memfd cannot do is refused with ErrGuestMemfdLimit, and
// nothing is left behind.
func TestGuestMemfdRefusals(t *testing.T) {
	vm := gmemVM(t)
	ctx := context.Background()
	fds, maps := testenv.OpenFDs(t), testenv.GuestMappings(t)
	_, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: 2 * mib, ReadOnly: true}}, guestmem.WithGuestMemfd(vm))
	require.ErrorIs(t, err, guestmem.ErrGuestMemfdLimit)
	require.Contains(t, err.Error(), "KVM_MEM_READONLY")
	_, err = guestmem.New(gmemLayout, guestmem.WithGuestMemfd(vm), guestmem.WithHugetlb(2*mib))
	require.ErrorIs(t, err, guestmem.ErrGuestMemfdLimit)
	require.ErrorIs(t, err, guestmem.ErrBadOption)
	_, err = guestmem.New(gmemLayout, guestmem.WithGuestMemfd(vm), guestmem.WithKSM())
	require.ErrorIs(t, err, guestmem.ErrGuestMemfdLimit)
	require.ErrorIs(t, err, guestmem.ErrBacking)
	_, err = guestmem.New(gmemLayout, guestmem.WithGuestMemfd(nil))
	require.ErrorIs(t, err, guestmem.ErrBacking)
	require.Equal(t, fds, testenv.OpenFDs(t))
	require.Equal(t, maps, testenv.GuestMappings(t))

	m := newMemory(t, gmemLayout, guestmem.WithGuestMemfd(vm), guestmem.WithHotplug(8*mib))
	require.ErrorIs(t, m.UseHugepages(), guestmem.ErrGuestMemfdLimit)
	require.ErrorIs(t, m.NoHugepages(), guestmem.ErrGuestMemfdLimit)
	require.ErrorIs(t, m.UseKSM(), guestmem.ErrGuestMemfdLimit)
	_, err = m.AddRegion(guestmem.RegionSpec{GPA: 1 << 30, Size: 2 * mib, ReadOnly: true})
	require.ErrorIs(t, err, guestmem.ErrGuestMemfdLimit)

	// Another VM: KVM binds the guest_memfd to its own.
	other := testenv.VM(t)
	err = m.Register(other)
	require.ErrorIs(t, err, guestmem.ErrGuestMemfdLimit)
	require.Empty(t, other.Slots())

	// Tracking while registered, either way round.
	require.NoError(t, m.StartDirtyTracking(guestmem.HostWritesOnly()))
	require.ErrorIs(t, m.Register(vm), guestmem.ErrGuestMemfdLimit)
	require.Empty(t, vm.Slots())
	require.NoError(t, m.StopDirtyTracking())
	require.NoError(t, m.Register(vm))
	err = m.StartDirtyTracking()
	require.ErrorIs(t, err, guestmem.ErrGuestMemfdLimit)
	require.Contains(t, err.Error(), "KVM_MEM_LOG_DIRTY_PAGES")
	require.False(t, m.Tracking())
	for _, s := range vm.Slots() {
		require.Equal(t, kvm.GuestMemfdSlot, s.Flags, "slot %d", s.ID)
		require.Equal(t, m.GuestMemfd(), s.GuestMemfd)
	}

	// An increment needs KVM's log; a full Save works.
	var buf bytes.Buffer
	_, err = m.Save(ctx, &buf, guestmem.SaveOptions{})
	require.NoError(t, err)
	_, err = m.Save(ctx, io.Discard, guestmem.SaveOptions{Incremental: true})
	require.ErrorIs(t, err, guestmem.ErrGuestMemfdLimit)
	require.ErrorIs(t, err, guestmem.ErrNeedFullSave)

	// Pre-copy of a registered guest needs dirty tracking.
	a, b := pipeConns()
	_, err = m.Migrate(ctx, []io.ReadWriter{a}, guestmem.MigrateOptions{Pause: func(context.Context) error { return nil },
		Resume: func() error { return nil }, IOTimeout: time.Second})
	require.ErrorIs(t, err, guestmem.ErrGuestMemfdLimit)
	a.Close()
	b.Close()

	// No userfaultfd on guest_memfd: the lazy and on-demand restores.
	snap := buf.Bytes()
	vm2 := gmemVM(t)
	_, _, err = guestmem.RestoreOnDemand(ctx, []io.ReaderAt{bytes.NewReader(snap)}, guestmem.OnDemandOptions{},
		guestmem.WithGuestMemfd(vm2))
	require.ErrorIs(t, err, guestmem.ErrGuestMemfdLimit)
	f, err := os.CreateTemp(t.TempDir(), "snap")
	require.NoError(t, err)
	defer f.Close()
	_, err = f.Write(snap)
	require.NoError(t, err)
	_, err = guestmem.RestoreLazy(ctx, []*os.File{f}, guestmem.WithGuestMemfd(vm2))
	require.ErrorIs(t, err, guestmem.ErrGuestMemfdLimit)
	require.Empty(t, vm2.Slots())
}

// MADV_POPULATE_WRITE makes every page of the guest_memfd resident and
// mapped for the host. fallocate allocates the pages without preparing
// them: KVM zeroes a guest_memfd page when it is first used, so mincore
// (which counts only prepared pages) and smaps see none yet. Either way
// the data written is there; Discard then punches a hole: mincore drops,
// reads are zero.
func TestGuestMemfdPrefaultAndDiscard(t *testing.T) {
	for _, fallocate := range []bool{false, true} {
		name := map[bool]string{false: "populate-write", true: "fallocate"}[fallocate]
		t.Run(name, func(t *testing.T) {
			defer guestmem.SetGuestMemfdPrefault(fallocate)()
			vm := gmemVM(t)
			m := newMemory(t, gmemLayout, guestmem.WithGuestMemfd(vm))
			regs := m.Regions()
			require.Zero(t, residentPages(t, m, regs[0]))
			require.NoError(t, m.Prefault(context.Background(), guestmem.PrefaultOptions{Workers: 2, ChunkSize: 2 * mib}))
			st, err := m.Stats()
			require.NoError(t, err)
			prepared := 0 // pages of region 0 mincore reports after the writes below
			for i, r := range regs {
				if fallocate {
					require.Zero(t, residentPages(t, m, r), "fallocate leaves the pages unprepared")
					require.Zero(t, st[i].Resident, "and unmapped for the host")
				} else {
					require.Equal(t, int(r.Size/page), residentPages(t, m, r), "region %v all resident", r.GPA)
					require.Equal(t, r.Size, st[i].Resident, "MADV_POPULATE_WRITE maps the pages for the host")
				}
			}
			if fallocate {
				prepared = 4 * mib / page
			} else {
				prepared = int(regs[0].Size / page)
			}
			_, err = m.WriteAt(bytes.Repeat([]byte{0xab}, 4*mib), 0)
			require.NoError(t, err)
			require.Equal(t, prepared, residentPages(t, m, regs[0]))
			require.NoError(t, m.Discard(mib, 2*mib))
			require.Equal(t, prepared-2*mib/page, residentPages(t, m, regs[0]), "the hole's pages are gone")
			b := make([]byte, 4*mib)
			_, err = m.ReadAt(b, 0)
			require.NoError(t, err)
			require.Equal(t, bytes.Repeat([]byte{0xab}, mib), b[:mib])
			require.Equal(t, make([]byte, 2*mib), b[mib:3*mib], "discarded bytes read zero")
			require.Equal(t, bytes.Repeat([]byte{0xab}, mib), b[3*mib:])
			// DropPageCache keeps the data: it is in the file.
			require.NoError(t, m.DropPageCache())
			st, err = m.Stats()
			require.NoError(t, err)
			require.Zero(t, st[0].Resident, "the host's mapping dropped its pages")
			_, err = m.ReadAt(b, 0)
			require.NoError(t, err)
			require.Equal(t, byte(0xab), b[0])
		})
	}
}

// WithNUMA binds guest_memfd memory: the kernel reports the policy, and
// after Prefault every page is on node 0.
func TestGuestMemfdNUMANode0(t *testing.T) {
	vm := gmemVM(t)
	m := newMemory(t, gmemLayout, guestmem.WithGuestMemfd(vm), guestmem.WithNUMA(guestmem.NUMABind(0)))
	for _, r := range m.Regions() {
		p, err := m.NUMAPolicyAt(r.GPA + 5*page)
		require.NoError(t, err)
		require.Equal(t, "bind:0", p.String())
	}
	require.NoError(t, m.Prefault(context.Background(), guestmem.PrefaultOptions{}))
	for _, r := range m.Regions() {
		require.Equal(t, 0, testenv.NodeOfPage(t, r.HostAddr+uintptr(r.Size)-page))
	}
	got, err := m.NodePages()
	require.NoError(t, err)
	require.Equal(t, map[int]uint64{0: m.Size()}, got)
}

// Prefault of 1 GiB of guest_memfd memory, MADV_POPULATE_WRITE against
// fallocate; "+touch" also writes one byte of every page through the host
// mapping afterwards, which is where fallocate's pages are zeroed and
// mapped. docs/benchmarks.md has the figures.
func BenchmarkGuestMemfdPrefault(b *testing.B) {
	const size = 1 << 30
	for _, c := range []struct {
		name             string
		fallocate, touch bool
	}{{"populate-write", false, false}, {"fallocate", true, false}, {"populate-write+touch", false, true},
		{"fallocate+touch", true, true}} {
		b.Run(c.name, func(b *testing.B) {
			defer guestmem.SetGuestMemfdPrefault(c.fallocate)()
			vm := gmemVM(b)
			b.SetBytes(size)
			for b.Loop() {
				b.StopTimer()
				m, err := guestmem.New(guestmem.Layout{{GPA: 0, Size: size}}, guestmem.WithGuestMemfd(vm))
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				err = m.Prefault(context.Background(), guestmem.PrefaultOptions{})
				if err == nil && c.touch {
					var mem []byte
					if mem, err = m.Slice(0, size); err == nil {
						for i := 0; i < len(mem); i += page {
							mem[i] = 1
						}
					}
				}
				b.StopTimer()
				if err := errors.Join(err, m.Close()); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

func pipeConns() (net.Conn, net.Conn) { return net.Pipe() }

// migrateInto migrates src (host writes only) into guest_memfd memory on
// vm, with o; it returns the receiver's memory and both errors.
func migrateInto(t *testing.T, src *guestmem.Memory, vm *kvm.VM, o guestmem.MigrateOptions) (*guestmem.Memory,
	error, error) {
	t.Helper()
	a, b := pipeConns()
	defer a.Close()
	defer b.Close()
	var dst *guestmem.Memory
	var rerr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		dst, _, rerr = guestmem.ReceiveMigration(context.Background(), []io.ReadWriter{b}, guestmem.WithGuestMemfd(vm))
		b.Close()
	}()
	_, serr := src.Migrate(context.Background(), []io.ReadWriter{a}, o)
	a.Close()
	<-done
	if dst != nil {
		t.Cleanup(func() { require.NoError(t, dst.Close()) })
	}
	return dst, serr, rerr
}

// Pre-copy migration (host writes only) into guest_memfd memory arrives
// whole; a sender that switches to post-copy is refused before the
// switchover, so it resumes its guest.
func TestGuestMemfdReceiveMigration(t *testing.T) {
	vm := gmemVM(t)
	src := newMemory(t, gmemLayout)
	want := bytes.Repeat([]byte("guest_memfd!"), 1<<16)
	_, err := src.WriteAt(want, 16*mib)
	require.NoError(t, err)
	var resumed atomic.Int32
	o := guestmem.MigrateOptions{HostWritesOnly: true, Pause: func(context.Context) error { return nil },
		Resume: func() error { resumed.Add(1); return nil }}
	dst, serr, rerr := migrateInto(t, src, vm, o)
	require.NoError(t, serr)
	require.NoError(t, rerr)
	require.Equal(t, guestmem.GuestMemfd, dst.Backing())
	got := make([]byte, len(want))
	_, err = dst.ReadAt(got, 16*mib)
	require.NoError(t, err)
	require.Equal(t, want, got)

	o.PostCopy = true
	vm2 := gmemVM(t)
	dst, serr, rerr = migrateInto(t, src, vm2, o)
	require.Nil(t, dst)
	require.ErrorIs(t, rerr, guestmem.ErrGuestMemfdLimit)
	require.Error(t, serr)
	require.NotErrorIs(t, serr, guestmem.ErrPostCopyLost, "refused before the switchover")
	require.Contains(t, serr.Error(), "userfaultfd", "the sender learns why")
	require.Equal(t, int32(1), resumed.Load(), "the sender resumed its guest")
	require.Empty(t, vm2.Slots())
}
