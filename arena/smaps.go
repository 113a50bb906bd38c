package arena

import (
	"bufio"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
)

// Stats is what /proc/self/smaps says about the VMAs (kernel memory areas)
// that intersect a range of a mapping. Byte counts are summed over those VMAs
// in full; the operations of this package split VMAs at the edges of the
// ranges they touch, so for ranges that were mapped or advised as a unit the
// sums are exact.
type Stats struct {
	Rss            int64 // resident bytes
	Locked         int64 // bytes locked by mlock
	AnonHugePages  int64 // anonymous memory backed by transparent hugepages
	ShmemPmdMapped int64 // shmem/memfd memory mapped with huge PMDs
	FilePmdMapped  int64 // file memory mapped with huge PMDs
	Hugetlb        int64 // hugetlb memory mapped (Shared_Hugetlb + Private_Hugetlb; not in Rss)
	Swap           int64 // bytes swapped out
	VMAs           []VMA // the VMAs, lowest address first
}

// VMA is one kernel virtual memory area as smaps reports it.
type VMA struct {
	Start, End uintptr
	Perms      string   // as in /proc/self/maps, e.g. "rw-s"
	Flags      []string // the VmFlags mnemonics, e.g. "rd", "wr", "lf", "hg", "dd"
	Rss        int64
	Locked     int64
	HugePages  int64 // AnonHugePages + ShmemPmdMapped + FilePmdMapped + hugetlb
	Hugetlb    int64 // Shared_Hugetlb + Private_Hugetlb
}

// HasFlag reports whether every VMA carries the VmFlags mnemonic f (see
// proc(5): "lf" lock-on-fault, "lo" locked, "hg" huge-page advised, "nh"
// no-huge-page advised, "dc" do-not-copy on fork, "dd" do-not-dump, ...).
func (s Stats) HasFlag(f string) bool {
	for _, v := range s.VMAs {
		if !slices.Contains(v.Flags, f) {
			return false
		}
	}
	return len(s.VMAs) > 0
}

// AnyFlag reports whether some VMA carries the VmFlags mnemonic f.
func (s Stats) AnyFlag(f string) bool {
	for _, v := range s.VMAs {
		if slices.Contains(v.Flags, f) {
			return true
		}
	}
	return false
}

// Stats reports /proc/self/smaps figures for the whole mapping (for an Arena,
// the whole reservation, mapped or not).
func (m *Mapping) Stats() (Stats, error) {
	return m.StatsRange(0, m.size)
}

// StatsRange reports /proc/self/smaps figures for the VMAs that intersect the
// page-aligned range [off, off+n).
func (m *Mapping) StatsRange(off, n int64) (Stats, error) {
	defer m.runlock(m.rlock())
	if err := m.checkPages("StatsRange", off, n, false); err != nil {
		return Stats{}, err
	}
	return m.statsRange(off, n)
}

func (m *Mapping) statsRange(off, n int64) (Stats, error) {
	return readSmaps(m.addr+uintptr(off), m.addr+uintptr(off+n))
}

// readSmaps parses /proc/self/smaps for VMAs intersecting [start, end).
func readSmaps(start, end uintptr) (Stats, error) {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		return Stats{}, fmt.Errorf("arena: reading smaps: %w", err)
	}
	defer f.Close()
	var st Stats
	var cur *VMA
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if lo, hi, ok := parseVMARange(fields[0]); ok && len(fields) >= 5 {
			cur = nil
			if lo < end && hi > start {
				st.VMAs = append(st.VMAs, VMA{Start: lo, End: hi, Perms: fields[1]})
				cur = &st.VMAs[len(st.VMAs)-1]
			}
			continue
		}
		if cur == nil {
			continue
		}
		key := strings.TrimSuffix(fields[0], ":")
		if key == "VmFlags" {
			cur.Flags = fields[1:]
			continue
		}
		if len(fields) != 3 || fields[2] != "kB" {
			continue
		}
		kb, err := strconv.ParseInt(fields[1], 10, 64)
		if err != nil {
			continue
		}
		b := kb << 10
		switch key {
		case "Rss":
			cur.Rss = b
			st.Rss += b
		case "Locked":
			cur.Locked = b
			st.Locked += b
		case "AnonHugePages":
			st.AnonHugePages += b
			cur.HugePages += b
		case "ShmemPmdMapped":
			st.ShmemPmdMapped += b
			cur.HugePages += b
		case "FilePmdMapped":
			st.FilePmdMapped += b
			cur.HugePages += b
		case "Shared_Hugetlb", "Private_Hugetlb":
			st.Hugetlb += b
			cur.Hugetlb += b
			cur.HugePages += b
		case "Swap":
			st.Swap += b
		}
	}
	if err := sc.Err(); err != nil {
		return Stats{}, fmt.Errorf("arena: reading smaps: %w", err)
	}
	return st, nil
}

// parseVMARange parses the "start-end" hex field that opens a VMA's record.
func parseVMARange(s string) (lo, hi uintptr, ok bool) {
	a, b, found := strings.Cut(s, "-")
	if !found {
		return 0, 0, false
	}
	l, err1 := strconv.ParseUint(a, 16, 64)
	h, err2 := strconv.ParseUint(b, 16, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, false
	}
	return uintptr(l), uintptr(h), true
}
