package kvm

import (
	"errors"
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestKernelAgreesOnGuestMemfdSlots goes around the slot table to check
// that the kernel refuses what the table refuses on guest_memfd slots
// (EINVAL, EEXIST), and accepts the slot the table accepts.
func TestKernelAgreesOnGuestMemfdSlots(t *testing.T) {
	vm := internalVM(t)
	const shared = GuestMemfdMmap | GuestMemfdInitShared
	if f, _ := vm.GuestMemfdFlags(); f&shared != shared {
		if os.Getenv("GMEM_REQUIRE_KVM") == "1" {
			t.Fatalf("GMEM_REQUIRE_KVM=1 but guest_memfd flags are %v", f)
		}
		t.Skipf("guest_memfd flags %v: the host cannot map it", f)
	}
	const size = 4 << 20
	g, err := vm.CreateGuestMemfd(size, shared)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	other := internalVM(t)
	foreign, err := other.CreateGuestMemfd(size, shared)
	if err != nil {
		t.Fatal(err)
	}
	defer foreign.Close()
	mem, err := unix.Mmap(g.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	host := hostAddr(mem)
	gm := uint32(GuestMemfdSlot)
	for _, c := range []struct {
		name  string
		flags uint32
		off   uint64
		size  uint64
		fd    int
		want  error
	}{
		{"dirty log", gm | uint32(LogDirtyPages), 0, size, g.FD(), syscall.EINVAL},
		{"read-only", gm | uint32(ReadOnly), 0, size, g.FD(), syscall.EINVAL},
		{"unaligned offset", gm, 512, pageSize, g.FD(), syscall.EINVAL},
		{"past the end", gm, pageSize, size, g.FD(), syscall.EINVAL},
		{"not a guest_memfd", gm, 0, pageSize, int(vm.kvmFD.Fd()), syscall.EINVAL},
		{"another VM's", gm, 0, pageSize, foreign.FD(), syscall.EINVAL},
	} {
		err := vm.setRegionGmem(0, c.flags, 0, c.size, host, c.fd, c.off)
		if !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v from the kernel", c.name, err, c.want)
			_ = vm.setRegion(0, 0, 0, 0, 0)
		}
	}
	if err := vm.setRegionGmem(0, gm, 0, size/2, host, g.FD(), 0); err != nil {
		t.Fatalf("a good slot: %v", err)
	}
	if err := vm.setRegionGmem(1, gm, 1<<30, size/2, host, g.FD(), 0); !errors.Is(err, ErrSlotOverlap) ||
		!errors.Is(err, syscall.EEXIST) {
		t.Errorf("the same offsets in a second slot: %v, want EEXIST", err)
	}
	// Changing the slot in place (here: a move) is refused: guest_memfd
	// slots are only created and deleted, which is why SetSlot recreates.
	if err := vm.setRegionGmem(0, gm, 1<<30, size/2, host, g.FD(), 0); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("moving in place: %v, want EINVAL", err)
	}
	if err := vm.setRegion(0, 0, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
}
