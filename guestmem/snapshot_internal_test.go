package guestmem

import (
	"hash/crc32"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/internal/procfs"
)

// The checksum goroutine reads guest memory: a fault there (a truncated
// backing file) must come back as a result, not kill the process.
func TestChecksumFaultIsAResult(t *testing.T) {
	b, err := unix.Mmap(-1, 0, 8192, unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(b)
	cs := startChecksummer()
	defer cs.stop()
	cs.jobs <- crcJob{p: b}
	if r := <-cs.results; !r.faulted || r.fault == 0 {
		t.Fatalf("checksum of PROT_NONE memory: %+v", r)
	}
	ok := []byte("guest memory")
	cs.jobs <- crcJob{crc: 0, p: ok}
	if r := <-cs.results; r.faulted || r.crc != crc32.Checksum(ok, castagnoli) {
		t.Fatalf("checksum after a fault: %+v", r)
	}
}

// A page in swap is data: the full Save's scan of anonymous memory must
// keep it (mincore, which the scan used before, reports it absent, and the
// page was then restored as zeros). This host cannot push pages to swap on
// demand (MADV_PAGEOUT moves none), so the presence logic is tested on
// pagemap entries as the kernel writes them for swapped pages.
func TestPopulatedRunsKeepSwappedPages(t *testing.T) {
	const ps = 4096
	swap := func(offset uint64) uint64 { return procfs.PageSwapped | offset<<5 | 1 } // swap type 1
	present := procfs.PagePresent | procfs.PageExclusive | 0x1234
	entries := []uint64{
		0, present, swap(7), swap(8), 0, // a run of RAM then swap
		0, 0, swap(9), present, // swap then RAM
		0, swap(10), // the last page, continuing into the next window
	}
	got := populatedRuns(entries, 0, ps, nil)
	want := []fdRange{{off: 1 * ps, n: 3 * ps}, {off: 7 * ps, n: 2 * ps}, {off: 10 * ps, n: ps}}
	if !slices.Equal(got, want) {
		t.Fatalf("runs %v, want %v", got, want)
	}
	// The next window starts with swap too: the run merges across windows.
	got = populatedRuns([]uint64{swap(11), 0}, 11*ps, ps, got)
	want[2].n = 2 * ps
	if !slices.Equal(got, want) {
		t.Fatalf("after the next window: %v, want %v", got, want)
	}
}
