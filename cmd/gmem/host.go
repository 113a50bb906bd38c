package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"

	"github.com/gmem-vmm/gmem/internal/units"
)

// The host facts both commands read come from /proc and /sys through an
// fs.FS rooted at "/" (os.DirFS("/") in the command, fstest.MapFS in tests).
// Paths below are relative to that root.
const (
	meminfoPath    = "proc/meminfo"
	overcommitPath = "proc/sys/vm/overcommit_memory"
	statusPath     = "proc/self/status"
	loadavgPath    = "proc/loadavg"
	thpDir         = "sys/kernel/mm/transparent_hugepage"
	hugepagesDir   = "sys/kernel/mm/hugepages"
)

// MemInfo is the part of /proc/meminfo the commands use, in bytes.
type MemInfo struct {
	Total       uint64 `json:"total_bytes"`
	Available   uint64 `json:"available_bytes"`
	CommitLimit uint64 `json:"commit_limit_bytes"`
	Committed   uint64 `json:"committed_bytes"`
}

// readMeminfo parses /proc/meminfo.
func readMeminfo(fsys fs.FS) (MemInfo, error) {
	b, err := fs.ReadFile(fsys, meminfoPath)
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

// checkFits returns an error, with the numbers and the flag to change, when
// size bytes do not fit in the host's available memory. It is called before anything is
// allocated.
func checkFits(fsys fs.FS, size Size, flag string) error {
	mi, err := readMeminfo(fsys)
	if err != nil {
		return err
	}
	if uint64(size) > mi.Available {
		return fmt.Errorf("size %v (%d bytes) is more than this host's available memory: MemAvailable is %s "+
			"(%d bytes) of %s total (/proc/meminfo); choose a smaller %s", size, uint64(size),
			units.Human(mi.Available), mi.Available, units.Human(mi.Total), flag)
	}
	return nil
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

// THPModes are the transparent hugepage settings in
// /sys/kernel/mm/transparent_hugepage. An empty mode means the file is
// absent (a kernel without THP).
type THPModes struct {
	Enabled      string `json:"enabled"`
	Defrag       string `json:"defrag"`
	ShmemEnabled string `json:"shmem_enabled"`
}

func readTHP(fsys fs.FS) THPModes {
	read := func(name string) string {
		b, err := fs.ReadFile(fsys, path.Join(thpDir, name))
		if err != nil {
			return ""
		}
		return selectedMode(string(b))
	}
	return THPModes{Enabled: read("enabled"), Defrag: read("defrag"), ShmemEnabled: read("shmem_enabled")}
}

// HugePool is one hugetlb pool of /sys/kernel/mm/hugepages.
type HugePool struct {
	PageSize uint64 `json:"page_size_bytes"`
	Total    uint64 `json:"total_pages"`
	Free     uint64 `json:"free_pages"`
}

// FreeBytes returns the free bytes of the pool.
func (p HugePool) FreeBytes() uint64 { return p.Free * p.PageSize }

// readHugePools lists the hugetlb pools, smallest page first.
func readHugePools(fsys fs.FS) []HugePool {
	ents, err := fs.ReadDir(fsys, hugepagesDir)
	if err != nil {
		return nil
	}
	var pools []HugePool
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
		num := func(f string) uint64 {
			b, err := fs.ReadFile(fsys, path.Join(hugepagesDir, e.Name(), f))
			if err != nil {
				return 0
			}
			v, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
			return v
		}
		pools = append(pools, HugePool{PageSize: n << 10, Total: num("nr_hugepages"), Free: num("free_hugepages")})
	}
	sort.Slice(pools, func(i, j int) bool { return pools[i].PageSize < pools[j].PageSize })
	return pools
}

// poolFor returns the pool of pageSize pages, if the host has one.
func poolFor(pools []HugePool, pageSize uint64) (HugePool, bool) {
	for _, p := range pools {
		if p.PageSize == pageSize {
			return p, true
		}
	}
	return HugePool{}, false
}

// readOvercommit returns vm.overcommit_memory, or -1 if unreadable.
func readOvercommit(fsys fs.FS) int {
	b, err := fs.ReadFile(fsys, overcommitPath)
	if err != nil {
		return -1
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return -1
	}
	return v
}

// capIPCLock is CAP_IPC_LOCK's bit in the capability sets.
const capIPCLock = 14

// hasCapIPCLock reports whether this process's effective capabilities
// include CAP_IPC_LOCK, which exempts it from RLIMIT_MEMLOCK.
func hasCapIPCLock(fsys fs.FS) bool {
	b, err := fs.ReadFile(fsys, statusPath)
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
