package main

import (
	"strconv"
	"strings"
	"testing"
	"testing/fstest"
)

// fakeHost is a host's /proc and /sys as the commands read them.
type fakeHost struct {
	memTotalKB, memAvailKB uint64
	thpEnabled, thpDefrag  string
	shmemEnabled           string
	pools                  map[string][2]int // "hugepages-2048kB": {total, free}
	overcommit             string
	capEff                 string
}

func defaultFakeHost() fakeHost {
	return fakeHost{
		memTotalKB: 24 << 20, memAvailKB: 20 << 20,
		thpEnabled: "always [madvise] never", thpDefrag: "always defer defer+madvise [madvise] never",
		shmemEnabled: "always within_size advise [never] deny force",
		pools:        map[string][2]int{"hugepages-2048kB": {0, 0}, "hugepages-1048576kB": {0, 0}},
		overcommit:   "0\n",
		capEff:       "000001ffffffffff", // root: every capability
	}
}

func (h fakeHost) fs() fstest.MapFS {
	file := func(s string) *fstest.MapFile { return &fstest.MapFile{Data: []byte(s)} }
	m := fstest.MapFS{
		meminfoPath: file("MemTotal:       " + itoa(h.memTotalKB) + " kB\nMemFree:  1 kB\nMemAvailable:   " +
			itoa(h.memAvailKB) + " kB\nCommitLimit:   1024 kB\nCommitted_AS:  512 kB\nHugePages_Total: 0\n"),
		overcommitPath: file(h.overcommit),
		statusPath:     file("Name:\tgmem\nCapInh:\t0000000000000000\nCapEff:\t" + h.capEff + "\n"),
	}
	if h.thpEnabled != "" {
		m[thpDir+"/enabled"] = file(h.thpEnabled + "\n")
		m[thpDir+"/defrag"] = file(h.thpDefrag + "\n")
		m[thpDir+"/shmem_enabled"] = file(h.shmemEnabled + "\n")
	}
	for name, tf := range h.pools {
		m[hugepagesDir+"/"+name+"/nr_hugepages"] = file(itoa(uint64(tf[0])) + "\n")
		m[hugepagesDir+"/"+name+"/free_hugepages"] = file(itoa(uint64(tf[1])) + "\n")
	}
	return m
}

func itoa(v uint64) string { return strconv.FormatUint(v, 10) }

func TestReadMeminfo(t *testing.T) {
	mi, err := readMeminfo(defaultFakeHost().fs())
	if err != nil {
		t.Fatal(err)
	}
	if mi.Total != 24<<30 || mi.Available != 20<<30 || mi.CommitLimit != 1<<20 || mi.Committed != 512<<10 {
		t.Fatalf("readMeminfo = %+v", mi)
	}
	if _, err := readMeminfo(fstest.MapFS{meminfoPath: {Data: []byte("MemTotal: 1 kB\n")}}); err == nil {
		t.Fatal("meminfo without MemAvailable accepted")
	}
	if _, err := readMeminfo(fstest.MapFS{}); err == nil {
		t.Fatal("missing meminfo accepted")
	}
}

func TestCheckFitsGivesTheNumbers(t *testing.T) {
	h := defaultFakeHost()
	h.memAvailKB = 3 << 20 // 3 GiB
	fsys := h.fs()
	if err := checkFits(fsys, 2*GiB, "--sizes"); err != nil {
		t.Fatalf("2 GiB in 3 GiB available: %v", err)
	}
	err := checkFits(fsys, 4*GiB, "--sizes")
	if err == nil {
		t.Fatal("4 GiB accepted with 3 GiB available")
	}
	for _, want := range []string{"4GiB", "4294967296", "MemAvailable is 3.0 GiB", "3221225472", "24.0 GiB total"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

func TestSelectedMode(t *testing.T) {
	for in, want := range map[string]string{
		"always [madvise] never\n":                     "madvise",
		"[always] madvise never":                       "always",
		"always within_size advise [never] deny force": "never",
		"advise\n": "advise",
		"":         "",
	} {
		if got := selectedMode(in); got != want {
			t.Errorf("selectedMode(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestReadTHPAndPools(t *testing.T) {
	h := defaultFakeHost()
	h.pools = map[string][2]int{"hugepages-1048576kB": {2, 1}, "hugepages-2048kB": {512, 100}, "junk": {1, 1}}
	fsys := h.fs()
	if got := readTHP(fsys); got != (THPModes{Enabled: "madvise", Defrag: "madvise", ShmemEnabled: "never"}) {
		t.Errorf("readTHP = %+v", got)
	}
	pools := readHugePools(fsys)
	want := []HugePool{{PageSize: 2 << 20, Total: 512, Free: 100}, {PageSize: 1 << 30, Total: 2, Free: 1}}
	if len(pools) != 2 || pools[0] != want[0] || pools[1] != want[1] {
		t.Fatalf("readHugePools = %+v, want %+v", pools, want)
	}
	if p, ok := poolFor(pools, 2<<20); !ok || p.FreeBytes() != 200<<20 {
		t.Errorf("poolFor(2M) = %+v, %v", p, ok)
	}
	if _, ok := poolFor(pools, 4096); ok {
		t.Error("poolFor(4K) found a pool")
	}
	h.thpEnabled = ""
	if got := readTHP(h.fs()); got != (THPModes{}) {
		t.Errorf("readTHP without THP = %+v", got)
	}
}

func TestOvercommitAndCapabilities(t *testing.T) {
	h := defaultFakeHost()
	h.overcommit = "2\n"
	h.capEff = "0000000000000000"
	fsys := h.fs()
	if readOvercommit(fsys) != 2 || hasCapIPCLock(fsys) {
		t.Fatalf("overcommit %d, CAP_IPC_LOCK %v", readOvercommit(fsys), hasCapIPCLock(fsys))
	}
	h.capEff = "0000000000004000" // CAP_IPC_LOCK alone
	if !hasCapIPCLock(h.fs()) {
		t.Fatal("CAP_IPC_LOCK not seen")
	}
	if readOvercommit(fstest.MapFS{}) != -1 {
		t.Fatal("missing overcommit_memory not -1")
	}
}

func TestHugetlbUnavailable(t *testing.T) {
	pools := []HugePool{{PageSize: 2 << 20, Total: 100, Free: 60}}
	if why := hugetlbUnavailable(pools, 2<<20, 64*MiB); why != "" {
		t.Errorf("64 MiB from 60 free pages: %s", why)
	}
	why := hugetlbUnavailable(pools, 2<<20, 256*MiB)
	for _, want := range []string{"60 free pages of 100", "needs 128", "echo 168 > /proc/sys/vm/nr_hugepages"} {
		if !strings.Contains(why, want) {
			t.Errorf("%q does not say %q", why, want)
		}
	}
	if why := hugetlbUnavailable(pools, 1<<30, GiB); !strings.Contains(why, "no 1GiB hugetlb pool") {
		t.Errorf("1G pool: %q", why)
	}
	pools = append(pools, HugePool{PageSize: 1 << 30, Total: 4, Free: 4})
	if why := hugetlbUnavailable(pools, 1<<30, 1536*MiB); !strings.Contains(why, "not a multiple") {
		t.Errorf("1.5 GiB of 1 GiB pages: %q", why)
	}
}
