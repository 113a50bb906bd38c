// Package procfs reads what /proc says about process memory. It is the one
// place the project parses /proc's maps, smaps, smaps_rollup and pagemap
// files.
package procfs

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
)

// Bits of a /proc/self/pagemap entry (Documentation/admin-guide/mm/pagemap.rst).
const (
	// PagePresent: the page is in RAM.
	PagePresent uint64 = 1 << 63
	// PageSwapped: the page is in swap (a swap entry in the page table).
	PageSwapped uint64 = 1 << 62
	// PageFileOrShared: the page is a file page or shared anonymous memory;
	// clear for private anonymous pages, including a private file mapping's
	// copy-on-write copies.
	PageFileOrShared uint64 = 1 << 61
	// PageExclusive: the page is mapped exclusively (by this process only).
	PageExclusive uint64 = 1 << 56
)

// EntrySize is the size of one pagemap entry: a little-endian-on-this-host
// 64-bit word per virtual page.
const EntrySize = 8

// Populated reports whether a pagemap entry holds data: the page is in RAM
// or in swap. mincore reports only the first, so a scan built on it loses
// swapped-out anonymous pages; this does not.
func Populated(e uint64) bool { return e&(PagePresent|PageSwapped) != 0 }

// Pagemap reads /proc/self/pagemap. Flags are readable without privilege
// (frame numbers read as zero without CAP_SYS_ADMIN, and are not used here).
type Pagemap struct {
	f   *os.File
	buf []byte
}

// OpenPagemap opens this process's pagemap.
func OpenPagemap() (*Pagemap, error) {
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return nil, fmt.Errorf("procfs: %w", err)
	}
	return &Pagemap{f: f}, nil
}

// Close closes the pagemap file.
func (p *Pagemap) Close() error { return p.f.Close() }

// Read fills entries with the pagemap entries of the pages starting at the
// page-aligned address addr, one per page of pageSize bytes (the base page
// size of the host).
func (p *Pagemap) Read(addr uintptr, pageSize int, entries []uint64) error {
	if addr%uintptr(pageSize) != 0 {
		return fmt.Errorf("procfs: pagemap read at unaligned address %#x", addr)
	}
	n := len(entries) * EntrySize
	if cap(p.buf) < n {
		p.buf = make([]byte, n)
	}
	b := p.buf[:n]
	off := int64(addr/uintptr(pageSize)) * EntrySize
	if _, err := p.f.ReadAt(b, off); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("procfs: reading pagemap of %d pages at %#x: %w", len(entries), addr, err)
	}
	for i := range entries {
		entries[i] = binary.NativeEndian.Uint64(b[i*EntrySize:])
	}
	return nil
}
