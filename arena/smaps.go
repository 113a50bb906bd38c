package arena

import (
	"fmt"
	"slices"

	"github.com/gmem-vmm/gmem/internal/procfs"
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
	KSM            int64 // bytes merged by KSM (smaps KSM), see UseKSM
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
	KSM        int64 // bytes merged by KSM
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

// readSmaps sums /proc/self/smaps over the VMAs intersecting [start, end).
func readSmaps(start, end uintptr) (Stats, error) {
	vmas, err := procfs.SmapsRange(start, end)
	if err != nil {
		return Stats{}, fmt.Errorf("arena: reading smaps: %w", err)
	}
	var st Stats
	if len(vmas) > 0 {
		st.VMAs = make([]VMA, len(vmas))
	}
	for i := range vmas {
		v := &vmas[i]
		hugetlb := v.SharedHugetlb + v.PrivateHugetlb
		st.VMAs[i] = VMA{
			Start: v.Start, End: v.End, Perms: v.Perms, Flags: v.Flags,
			Rss: v.Rss, Locked: v.Locked, Hugetlb: hugetlb, KSM: v.KSM,
			HugePages: v.AnonHugePages + v.ShmemPmdMapped + v.FilePmdMapped + hugetlb,
		}
		st.Rss += v.Rss
		st.Locked += v.Locked
		st.AnonHugePages += v.AnonHugePages
		st.ShmemPmdMapped += v.ShmemPmdMapped
		st.FilePmdMapped += v.FilePmdMapped
		st.Hugetlb += hugetlb
		st.Swap += v.Swap
		st.KSM += v.KSM
	}
	return st, nil
}
