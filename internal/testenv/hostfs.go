package testenv

import (
	"strconv"
	"testing/fstest"
)

// FakeHost is a host's /proc and /sys as package host and the gmem command
// read them, for tests that must not depend on the machine they run on.
type FakeHost struct {
	MemTotalKB, MemAvailKB uint64
	THPEnabled, THPDefrag  string // sysfs mode lines, "always [madvise] never"; "" for a kernel without THP
	ShmemEnabled           string
	// Pools are the hugetlb pools by directory name ("hugepages-2048kB"):
	// {total, free} pages, or {total, free, reserved, surplus}.
	Pools           map[string][]int
	Overcommit      string // overcommit_memory's content
	OvercommitRatio string
	CapEff          string            // CapEff of /proc/self/status, in hex
	NUMA            map[string]string // node directory ("node0") to its meminfo
	KSM             map[string]string // /sys/kernel/mm/ksm's files to their contents; nil for a kernel without KSM
}

// DefaultFakeHost is the development machine: 24 GiB, 20 GiB available,
// THP madvise, shmem hugepages never, empty 2 MiB and 1 GiB pools,
// heuristic overcommit, every capability (root), one NUMA node.
func DefaultFakeHost() FakeHost {
	return FakeHost{
		MemTotalKB: 24 << 20, MemAvailKB: 20 << 20,
		THPEnabled: "always [madvise] never", THPDefrag: "always defer defer+madvise [madvise] never",
		ShmemEnabled:    "always within_size advise [never] deny force",
		Pools:           map[string][]int{"hugepages-2048kB": {0, 0}, "hugepages-1048576kB": {0, 0}},
		Overcommit:      "0\n",
		OvercommitRatio: "50\n",
		CapEff:          "000001ffffffffff",
		NUMA:            map[string]string{"node0": "Node 0 MemTotal:       25165824 kB\nNode 0 MemFree:        20971520 kB\n"},
	}
}

// FS returns the files of h, rooted at "/".
func (h FakeHost) FS() fstest.MapFS {
	file := func(s string) *fstest.MapFile { return &fstest.MapFile{Data: []byte(s)} }
	itoa := func(v uint64) string { return strconv.FormatUint(v, 10) }
	m := fstest.MapFS{
		"proc/meminfo": file("MemTotal:       " + itoa(h.MemTotalKB) + " kB\nMemFree:  1 kB\nMemAvailable:   " +
			itoa(h.MemAvailKB) + " kB\nCommitLimit:   1024 kB\nCommitted_AS:  512 kB\nHugePages_Total: 0\n"),
		"proc/sys/vm/overcommit_memory": file(h.Overcommit),
		"proc/sys/vm/overcommit_ratio":  file(h.OvercommitRatio),
		"proc/self/status":              file("Name:\tgmem\nCapInh:\t0000000000000000\nCapEff:\t" + h.CapEff + "\n"),
	}
	if h.THPEnabled != "" {
		const thp = "sys/kernel/mm/transparent_hugepage/"
		m[thp+"enabled"] = file(h.THPEnabled + "\n")
		m[thp+"defrag"] = file(h.THPDefrag + "\n")
		m[thp+"shmem_enabled"] = file(h.ShmemEnabled + "\n")
	}
	for name, n := range h.Pools {
		dir := "sys/kernel/mm/hugepages/" + name + "/"
		for i, f := range []string{"nr_hugepages", "free_hugepages", "resv_hugepages", "surplus_hugepages"} {
			v := 0
			if i < len(n) {
				v = n[i]
			}
			m[dir+f] = file(strconv.Itoa(v) + "\n")
		}
	}
	for name, v := range h.KSM {
		m["sys/kernel/mm/ksm/"+name] = file(v + "\n")
	}
	for name, meminfo := range h.NUMA {
		m["sys/devices/system/node/"+name+"/meminfo"] = file(meminfo)
		m["sys/devices/system/node/"+name+"/cpulist"] = file("0-1\n")
	}
	return m
}
