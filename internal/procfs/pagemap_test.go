package procfs

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func TestPagemapSeesWrittenPages(t *testing.T) {
	ps := os.Getpagesize()
	mem, err := unix.Mmap(-1, 0, 8*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	if err := unix.Madvise(mem, unix.MADV_NOHUGEPAGE); err != nil {
		t.Fatal(err)
	}
	mem[1*ps] = 1
	mem[5*ps+7] = 2
	p, err := OpenPagemap()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	e := make([]uint64, 8)
	addr := uintptr(unixAddr(mem))
	if err := p.Read(addr, ps, e); err != nil {
		t.Fatal(err)
	}
	for i, v := range e {
		want := i == 1 || i == 5
		if Populated(v) != want {
			t.Errorf("page %d: entry %#x, populated %v, want %v", i, v, Populated(v), want)
		}
		if want && v&PageFileOrShared != 0 {
			t.Errorf("page %d: private anonymous page reported as file or shared (%#x)", i, v)
		}
	}
	if err := p.Read(addr+1, ps, e); err == nil {
		t.Error("an unaligned address was accepted")
	}
}

func TestPopulatedCountsSwap(t *testing.T) {
	for _, c := range []struct {
		e    uint64
		want bool
	}{
		{0, false},
		{PagePresent, true},
		{PageSwapped, true},                      // a swap entry: data that mincore does not see
		{PageSwapped | 0x1234<<5 | 3, true},      // swap type and offset bits set
		{PagePresent | PageExclusive | 42, true}, // a frame number
		{PageFileOrShared | PageExclusive, false},
	} {
		if got := Populated(c.e); got != c.want {
			t.Errorf("Populated(%#x) = %v, want %v", c.e, got, c.want)
		}
	}
}
