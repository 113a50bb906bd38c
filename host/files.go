package host

import (
	"bufio"
	"bytes"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"

	"github.com/gmem-vmm/gmem/internal/numa"
	"github.com/gmem-vmm/gmem/internal/units"
)

// The files the readers use, relative to the root of the fs.FS they are
// given (the host's "/").
const (
	meminfoPath         = "proc/meminfo"
	overcommitPath      = "proc/sys/vm/overcommit_memory"
	overcommitRatioPath = "proc/sys/vm/overcommit_ratio"
	statusPath          = "proc/self/status"
	thpDir              = "sys/kernel/mm/transparent_hugepage"
	hugepagesDir        = "sys/kernel/mm/hugepages"
	ksmDir              = "sys/kernel/mm/ksm"
)

// MemInfo is the part of /proc/meminfo that guest memory depends on, in
// bytes.
type MemInfo struct {
	Total     uint64 `json:"total_bytes"`     // MemTotal
	Available uint64 `json:"available_bytes"` // MemAvailable: what a new guest can have without swapping
	// CommitLimit and Committed (Committed_AS) bound what can be
	// allocated under strict overcommit (vm.overcommit_memory=2).
	CommitLimit uint64 `json:"commit_limit_bytes"`
	Committed   uint64 `json:"committed_bytes"`
}

// ReadMemInfo parses /proc/meminfo under root. A file without a
// MemAvailable line (Linux before 3.14) is an error.
func ReadMemInfo(root fs.FS) (MemInfo, error) {
	b, err := fs.ReadFile(root, meminfoPath)
	if err != nil {
		return MemInfo{}, fmt.Errorf("reading /%s: %w", meminfoPath, err)
	}
	var mi MemInfo
	found := false
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		v, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			continue
		}
		if len(f) > 2 && f[2] == "kB" {
			v *= 1024
		}
		switch f[0] {
		case "MemTotal:":
			mi.Total = v
		case "MemAvailable:":
			mi.Available, found = v, true
		case "CommitLimit:":
			mi.CommitLimit = v
		case "Committed_AS:":
			mi.Committed = v
		}
	}
	if !found {
		return MemInfo{}, fmt.Errorf("/%s has no MemAvailable line", meminfoPath)
	}
	return mi, nil
}

// THPModes are the selected transparent hugepage modes of
// /sys/kernel/mm/transparent_hugepage. An empty mode means the file is
// absent (a kernel without THP).
type THPModes struct {
	Enabled string `json:"enabled"` // anonymous memory: always, madvise or never
	// Defrag is whether a THP fault compacts memory: always, defer,
	// defer+madvise, madvise or never.
	Defrag       string `json:"defrag"`
	ShmemEnabled string `json:"shmem_enabled"` // memfd and shared memory: always, within_size, advise, never, deny, force
}

// ReadTHP reads the transparent hugepage modes under root.
func ReadTHP(root fs.FS) THPModes {
	read := func(name string) string {
		b, err := fs.ReadFile(root, path.Join(thpDir, name))
		if err != nil {
			return ""
		}
		return selectedMode(string(b))
	}
	return THPModes{Enabled: read("enabled"), Defrag: read("defrag"), ShmemEnabled: read("shmem_enabled")}
}

// selectedMode returns the bracketed word of a sysfs mode file such as
// "always [madvise] never", or the whole trimmed content if none is
// bracketed.
func selectedMode(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '['); i >= 0 {
		if j := strings.IndexByte(s[i:], ']'); j > 0 {
			return s[i+1 : i+j]
		}
	}
	return s
}

// HugePool is one hugetlb pool, /sys/kernel/mm/hugepages/hugepages-<size>kB.
type HugePool struct {
	PageSize uint64 `json:"page_size_bytes"`
	Total    uint64 `json:"total_pages"` // nr_hugepages: the persistent pool
	// Free (free_hugepages) counts every page not yet faulted in, the
	// Reserved ones among them.
	Free uint64 `json:"free_pages"`
	// Reserved (resv_hugepages) are free pages promised to mappings made
	// without MAP_NORESERVE that have not faulted them in yet.
	Reserved uint64 `json:"reserved_pages"`
	// Surplus (surplus_hugepages) are pages allocated above Total, up to
	// nr_overcommit_hugepages.
	Surplus uint64 `json:"surplus_pages"`
}

// FreeBytes returns the free bytes of the pool.
func (p HugePool) FreeBytes() uint64 { return p.Free * p.PageSize }

// HugePools are a host's hugetlb pools, smallest page first.
type HugePools []HugePool

// ReadHugePools lists the hugetlb pools under root, smallest page first;
// none on a kernel without hugetlbfs.
func ReadHugePools(root fs.FS) HugePools {
	ents, err := fs.ReadDir(root, hugepagesDir)
	if err != nil {
		return nil
	}
	var pools HugePools
	for _, e := range ents {
		kb, ok := strings.CutPrefix(e.Name(), "hugepages-")
		if !ok {
			continue
		}
		kb, ok = strings.CutSuffix(kb, "kB")
		n, err := strconv.ParseUint(kb, 10, 64)
		if !ok || err != nil {
			continue
		}
		num := func(f string) uint64 { return readUint(root, path.Join(hugepagesDir, e.Name(), f)) }
		pools = append(pools, HugePool{PageSize: n << 10, Total: num("nr_hugepages"), Free: num("free_hugepages"),
			Reserved: num("resv_hugepages"), Surplus: num("surplus_hugepages")})
	}
	sort.Slice(pools, func(i, j int) bool { return pools[i].PageSize < pools[j].PageSize })
	return pools
}

// Find returns the pool of pageSize pages, if the host has one.
func (p HugePools) Find(pageSize uint64) (HugePool, bool) {
	for _, pool := range p {
		if pool.PageSize == pageSize {
			return pool, true
		}
	}
	return HugePool{}, false
}

// Check returns nil when the pool of pageSize pages has enough free pages
// for size bytes of guest RAM, and otherwise an error saying what is
// missing: no such pool, a size that is not a multiple of the page size,
// or too few free pages (with the nr_hugepages to set, for 2 MiB pages).
// The message reads as the reason after "hugetlb is unavailable: ".
func (p HugePools) Check(pageSize, size uint64) error {
	pool, ok := p.Find(pageSize)
	if !ok {
		return fmt.Errorf("this host has no %v hugetlb pool", units.Size(pageSize))
	}
	if size%pageSize != 0 {
		return fmt.Errorf("%v is not a multiple of the %v page size", units.Size(size), units.Size(pageSize))
	}
	need := size / pageSize
	// Free counts pages other mappings have reserved but not touched yet
	// (resv_hugepages): they are not there for a new mapping.
	avail := pool.Free - min(pool.Reserved, pool.Free)
	if avail < need {
		hint := ""
		if pageSize == 2<<20 {
			hint = fmt.Sprintf(" (echo %d > /proc/sys/vm/nr_hugepages)", pool.Total+need-avail)
		}
		reserved := ""
		if pool.Reserved > 0 {
			reserved = fmt.Sprintf(" (%d of them reserved by other mappings)", pool.Reserved)
		}
		return fmt.Errorf("the %v pool has %d free pages of %d%s, and %v needs %d%s", units.Size(pageSize), pool.Free,
			pool.Total, reserved, units.Size(size), need, hint)
	}
	return nil
}

// Overcommit is the kernel's overcommit policy, vm.overcommit_memory and
// vm.overcommit_ratio.
type Overcommit struct {
	Mode    int    `json:"mode"` // 0 heuristic, 1 always, 2 strict; -1 if unreadable
	Meaning string `json:"meaning"`
	// Ratio is the percentage of RAM (beside swap) that CommitLimit allows
	// under strict overcommit; -1 if unreadable.
	Ratio int `json:"ratio"`
}

func readOvercommit(root fs.FS) Overcommit {
	o := Overcommit{Mode: readInt(root, overcommitPath), Ratio: readInt(root, overcommitRatioPath)}
	switch o.Mode {
	case 0:
		o.Meaning = "heuristic"
	case 1:
		o.Meaning = "always overcommit"
	case 2:
		o.Meaning = "strict (no overcommit)"
	default:
		o.Meaning = "unknown"
	}
	return o
}

// capIPCLock is CAP_IPC_LOCK's bit in the capability sets.
const capIPCLock = 14

// hasCapIPCLock reports whether this process's effective capabilities
// include CAP_IPC_LOCK, which exempts it from RLIMIT_MEMLOCK.
func hasCapIPCLock(root fs.FS) bool {
	b, err := fs.ReadFile(root, statusPath)
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && caps&(1<<capIPCLock) != 0
		}
	}
	return false
}

// NUMANode is one node of /sys/devices/system/node: where guest memory
// bound to it (guestmem's memory policy) comes from.
type NUMANode struct {
	ID    int    `json:"id"`
	CPUs  string `json:"cpus"`        // the node's cpulist, such as "0-3,8-11"; "" for a node without CPUs
	Total uint64 `json:"total_bytes"` // the node's MemTotal
	Free  uint64 `json:"free_bytes"`  // the node's MemFree
}

// readNUMA lists the NUMA nodes, lowest first; none on a kernel built
// without NUMA.
func readNUMA(root fs.FS) []NUMANode {
	var nodes []NUMANode
	for _, n := range numa.Nodes(root) {
		nodes = append(nodes, NUMANode{ID: n.ID, CPUs: n.CPUList, Total: n.Total, Free: n.Free})
	}
	return nodes
}

// KSM is the state of the kernel's same-page merging (/sys/kernel/mm/ksm),
// which guestmem's WithKSM and UseKSM opt guest RAM into.
type KSM struct {
	Available bool `json:"available"` // the kernel has KSM (CONFIG_KSM)
	// Run is ksmd's mode: 0 stopped (merged pages stay merged), 1
	// running, 2 stopped after unmerging everything.
	Run          int    `json:"run"`
	PagesShared  uint64 `json:"pages_shared"`  // pages kept, each backing several
	PagesSharing uint64 `json:"pages_sharing"` // pages merged into them: what merging saves
	// MergeAcrossNodes 1 merges pages of different NUMA nodes into one,
	// undoing a NUMA policy; 0 merges only within a node.
	MergeAcrossNodes int    `json:"merge_across_nodes"`
	PagesToScan      uint64 `json:"pages_to_scan"`
	SleepMillisecs   uint64 `json:"sleep_millisecs"`
}

// readKSM reads /sys/kernel/mm/ksm; a kernel without it is KSM{} with
// Available false.
func readKSM(root fs.FS) KSM {
	if _, err := fs.Stat(root, ksmDir); err != nil {
		return KSM{Run: -1, MergeAcrossNodes: -1}
	}
	return KSM{
		Available:        true,
		Run:              readInt(root, ksmDir+"/run"),
		PagesShared:      readUint(root, ksmDir+"/pages_shared"),
		PagesSharing:     readUint(root, ksmDir+"/pages_sharing"),
		MergeAcrossNodes: readInt(root, ksmDir+"/merge_across_nodes"),
		PagesToScan:      readUint(root, ksmDir+"/pages_to_scan"),
		SleepMillisecs:   readUint(root, ksmDir+"/sleep_millisecs"),
	}
}

// readUint returns the number in file name, or 0.
func readUint(root fs.FS, name string) uint64 {
	b, err := fs.ReadFile(root, name)
	if err != nil {
		return 0
	}
	v, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return v
}

// readInt returns the number in file name, or -1.
func readInt(root fs.FS, name string) int {
	b, err := fs.ReadFile(root, name)
	if err != nil {
		return -1
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return -1
	}
	return v
}
