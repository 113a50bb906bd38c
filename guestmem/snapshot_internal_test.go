package guestmem

import (
	"hash/crc32"
	"testing"

	"golang.org/x/sys/unix"
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
