//go:build amd64

package kvm_test

import (
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

const gmemShared = kvm.GuestMemfdMmap | kvm.GuestMemfdInitShared

// gmemVM returns a VM whose guest_memfd the host may map (Linux 6.18), or
// skips (fails under GMEM_REQUIRE_KVM=1).
func gmemVM(t *testing.T) *kvm.VM {
	t.Helper()
	vm := testenv.VM(t)
	flags, err := vm.GuestMemfdFlags()
	if err != nil {
		t.Fatal(err)
	}
	if flags&gmemShared != gmemShared {
		testenv.Skip(t, "this kernel's guest_memfd cannot be mapped by the host (flags %v; Linux 6.18 needed)", flags)
	}
	return vm
}

func newGmem(t *testing.T, vm *kvm.VM, size uint64) *kvm.GuestMemfd {
	t.Helper()
	g, err := vm.CreateGuestMemfd(size, gmemShared)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := g.Close(); err != nil {
			t.Error(err)
		}
	})
	return g
}

// The device and the VM report the same flags, and the flags are named.
func TestGuestMemfdFlags(t *testing.T) {
	vm := gmemVM(t)
	dev := vm.Capabilities().GuestMemfdFlags
	got, err := vm.GuestMemfdFlags()
	if err != nil || got != dev || got&gmemShared != gmemShared {
		t.Fatalf("VM flags %v (%v), device flags %v", got, err, dev)
	}
	if s := gmemShared.String(); s != "mmap|init-shared" {
		t.Errorf("String() = %q", s)
	}
	if s := (kvm.GuestMemfdFlags(0)).String(); s != "none" {
		t.Errorf("String() = %q", s)
	}
	if s := kvm.CapGuestMemfdFlags.String(); s != "KVM_CAP_GUEST_MEMFD_FLAGS" {
		t.Errorf("Cap String() = %q", s)
	}
}

// CreateGuestMemfd makes a close-on-exec kvm-gmem file that the host maps
// shared (not privately) and reaches only through the mapping.
func TestGuestMemfdCreate(t *testing.T) {
	vm := gmemVM(t)
	const size = 4 * mib
	g := newGmem(t, vm, size)
	if g.Size() != size || g.Flags() != gmemShared || g.VM() != vm {
		t.Fatalf("Size %#x Flags %v VM %p", g.Size(), g.Flags(), g.VM())
	}
	link, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(g.FD()))
	if err != nil || !strings.Contains(link, "kvm-gmem") {
		t.Fatalf("fd link %q (%v), want [kvm-gmem]", link, err)
	}
	fl, err := unix.FcntlInt(uintptr(g.FD()), unix.F_GETFD, 0)
	if err != nil || fl&unix.FD_CLOEXEC == 0 {
		t.Fatalf("F_GETFD = %#x, %v: want close-on-exec", fl, err)
	}
	if _, err := unix.Mmap(g.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE); !errors.Is(err, unix.EINVAL) {
		t.Errorf("MAP_PRIVATE: %v, want EINVAL", err)
	}
	b, err := unix.Mmap(g.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(b)
	b[size-1] = 0x5a
	c, err := unix.Mmap(g.FD(), size-page, page, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(c)
	if c[page-1] != 0x5a {
		t.Errorf("a second mapping reads %#x, want 0x5a", c[page-1])
	}
	var one [1]byte
	if _, err := unix.Pread(g.FD(), one[:], 0); !errors.Is(err, unix.ESPIPE) {
		t.Errorf("pread: %v, want ESPIPE (guest_memfd has no read)", err)
	}
	if err := unix.Ftruncate(g.FD(), 2*size); err == nil {
		t.Errorf("ftruncate succeeded; the size is meant to be fixed")
	}

	if _, err := vm.CreateGuestMemfd(0, gmemShared); !errors.Is(err, kvm.ErrSlotSize) {
		t.Errorf("size 0: %v", err)
	}
	if _, err := vm.CreateGuestMemfd(page+1, gmemShared); !errors.Is(err, kvm.ErrSlotUnaligned) {
		t.Errorf("unaligned size: %v", err)
	}
	err = func() error { _, err := vm.CreateGuestMemfd(page, 1<<2); return err }()
	if !errors.Is(err, kvm.ErrGuestMemfd) || !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("unknown flag: %v", err)
	}
	if err := g.Close(); err != nil || g.FD() != -1 || g.Close() != nil {
		t.Errorf("Close: %v, FD %d", err, g.FD())
	}
	closed := testenv.VM(t)
	closed.Close()
	if _, err := closed.CreateGuestMemfd(page, gmemShared); !errors.Is(err, kvm.ErrClosed) {
		t.Errorf("closed VM: %v", err)
	}
}

// The table refuses what KVM does not do with guest_memfd slots, each with
// its sentinel, before the kernel sees it.
func TestGuestMemfdSlotRefusals(t *testing.T) {
	vm := gmemVM(t)
	g := newGmem(t, vm, 8*mib)
	host := anon(t, 8*mib)
	h := host.Addr()
	first := kvm.Slot{ID: 0, GPA: 0, Size: 2 * mib, HostAddr: h, GuestMemfd: g}
	if err := vm.SetSlot(first); err != nil {
		t.Fatal(err)
	}
	s, err := vm.Slot(0)
	if err != nil || s.Flags != kvm.GuestMemfdSlot || s.Flags.String() != "guest-memfd" {
		t.Fatalf("slot 0 = %+v (%v), want GuestMemfdSlot set", s, err)
	}
	other := gmemVM(t)
	foreign := newGmem(t, other, 8*mib)
	closedG, err := vm.CreateGuestMemfd(page, gmemShared)
	if err != nil {
		t.Fatal(err)
	}
	closedG.Close()
	for _, c := range []struct {
		name string
		s    kvm.Slot
		want []error
	}{
		{"dirty log", kvm.Slot{ID: 1, GPA: 4 * mib, Size: 2 * mib, HostAddr: h, GuestMemfd: g, GuestMemfdOffset: 2 * mib,
			Flags: kvm.LogDirtyPages}, []error{kvm.ErrSlotFlags, kvm.ErrGuestMemfd}},
		{"read-only", kvm.Slot{ID: 1, GPA: 4 * mib, Size: 2 * mib, HostAddr: h, GuestMemfd: g, GuestMemfdOffset: 2 * mib,
			Flags: kvm.ReadOnly}, []error{kvm.ErrSlotFlags, kvm.ErrGuestMemfd}},
		{"unaligned offset", kvm.Slot{ID: 1, GPA: 4 * mib, Size: 2 * mib, HostAddr: h, GuestMemfd: g,
			GuestMemfdOffset: 2*mib + 512}, []error{kvm.ErrSlotUnaligned}},
		{"past the end", kvm.Slot{ID: 1, GPA: 4 * mib, Size: 4 * mib, HostAddr: h, GuestMemfd: g,
			GuestMemfdOffset: 6 * mib}, []error{kvm.ErrSlotSize}},
		{"offset overlaps slot 0", kvm.Slot{ID: 1, GPA: 4 * mib, Size: 2 * mib, HostAddr: h, GuestMemfd: g,
			GuestMemfdOffset: 1 * mib}, []error{kvm.ErrSlotOverlap}},
		{"another VM's", kvm.Slot{ID: 1, GPA: 4 * mib, Size: 2 * mib, HostAddr: h, GuestMemfd: foreign},
			[]error{kvm.ErrGuestMemfd}},
		{"closed", kvm.Slot{ID: 1, GPA: 4 * mib, Size: page, HostAddr: h, GuestMemfd: closedG},
			[]error{kvm.ErrGuestMemfd}},
		{"flag without memfd", kvm.Slot{ID: 1, GPA: 4 * mib, Size: page, HostAddr: h, Flags: kvm.GuestMemfdSlot},
			[]error{kvm.ErrSlotFlags}},
		{"offset without memfd", kvm.Slot{ID: 1, GPA: 4 * mib, Size: page, HostAddr: h, GuestMemfdOffset: page},
			[]error{kvm.ErrSlotFlags}},
	} {
		err := vm.SetSlot(c.s)
		for _, w := range c.want {
			wantSlotErr(t, c.name, err, "SetSlot", 1, w)
		}
	}
	if n := len(vm.Slots()); n != 1 {
		t.Errorf("%d slots after the refusals, want 1", n)
	}
	// Same offset range in another slot: the kernel would say EEXIST.
	if err := vm.SetSlot(kvm.Slot{ID: 1, GPA: 4 * mib, Size: 2 * mib, HostAddr: h, GuestMemfd: g}); !errors.Is(err, kvm.ErrSlotOverlap) {
		t.Errorf("same offset: %v", err)
	}
	// Setting the same slot again changes nothing; moving it recreates it
	// (KVM does not move guest_memfd slots in place).
	if err := vm.SetSlot(first); err != nil {
		t.Errorf("same slot again: %v", err)
	}
	moved := first
	moved.GPA = 16 * mib
	if err := vm.SetSlot(moved); err != nil {
		t.Fatalf("moving: %v", err)
	}
	if s, ok := vm.SlotAt(16 * mib); !ok || s.ID != 0 || s.GuestMemfd != g {
		t.Errorf("after the move: %+v %v", s, ok)
	}
	if err := vm.DeleteSlot(0); err != nil {
		t.Fatal(err)
	}
}
