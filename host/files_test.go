package host

import (
	"strings"
	"testing"
	"testing/fstest"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/internal/testenv"
)

func TestReadMemInfo(t *testing.T) {
	mi, err := ReadMemInfo(testenv.DefaultFakeHost().FS())
	require.NoError(t, err)
	require.Equal(t, MemInfo{Total: 24 << 30, Available: 20 << 30, CommitLimit: 1 << 20, Committed: 512 << 10}, mi)
	_, err = ReadMemInfo(fstest.MapFS{meminfoPath: {Data: []byte("MemTotal: 1 kB\n")}})
	require.ErrorContains(t, err, "/proc/meminfo has no MemAvailable line")
	_, err = ReadMemInfo(fstest.MapFS{})
	require.ErrorContains(t, err, "reading /proc/meminfo")
}

func TestSelectedMode(t *testing.T) {
	for in, want := range map[string]string{
		"always [madvise] never\n":                     "madvise",
		"[always] madvise never":                       "always",
		"always within_size advise [never] deny force": "never",
		"advise\n": "advise",
		"":         "",
	} {
		require.Equal(t, want, selectedMode(in), "selectedMode(%q)", in)
	}
}

func TestReadTHPAndPools(t *testing.T) {
	h := testenv.DefaultFakeHost()
	h.Pools = map[string][]int{"hugepages-1048576kB": {2, 1}, "hugepages-2048kB": {512, 100, 20, 3}, "junk": {1, 1}}
	fsys := h.FS()
	require.Equal(t, THPModes{Enabled: "madvise", Defrag: "madvise", ShmemEnabled: "never"}, ReadTHP(fsys))
	pools := ReadHugePools(fsys)
	require.Equal(t, HugePools{{PageSize: 2 << 20, Total: 512, Free: 100, Reserved: 20, Surplus: 3},
		{PageSize: 1 << 30, Total: 2, Free: 1}}, pools)
	p, ok := pools.Find(2 << 20)
	require.True(t, ok)
	require.Equal(t, uint64(200<<20), p.FreeBytes())
	_, ok = pools.Find(4096)
	require.False(t, ok, "a pool of 4 KiB pages")

	h.THPEnabled = ""
	require.Equal(t, THPModes{}, ReadTHP(h.FS()))
	require.Nil(t, ReadHugePools(fstest.MapFS{}))
}

func TestOvercommitAndCapabilities(t *testing.T) {
	h := testenv.DefaultFakeHost()
	h.Overcommit, h.OvercommitRatio, h.CapEff = "2\n", "80\n", "0000000000000000"
	fsys := h.FS()
	require.Equal(t, Overcommit{Mode: 2, Meaning: "strict (no overcommit)", Ratio: 80}, readOvercommit(fsys))
	require.False(t, hasCapIPCLock(fsys))
	h.CapEff = "0000000000004000" // CAP_IPC_LOCK alone
	require.True(t, hasCapIPCLock(h.FS()))
	require.Equal(t, Overcommit{Mode: -1, Meaning: "unknown", Ratio: -1}, readOvercommit(fstest.MapFS{}))
}

func TestReadNUMA(t *testing.T) {
	h := testenv.DefaultFakeHost()
	h.NUMA["node1"] = "Node 1 MemTotal:       1024 kB\nNode 1 MemFree:         512 kB\nNode 1 MemUsed: 512 kB\n"
	fsys := h.FS()
	fsys["sys/devices/system/node/online"] = &fstest.MapFile{Data: []byte("0-1\n")}
	require.Equal(t, []NUMANode{{ID: 0, CPUs: "0-1", Total: 24 << 30, Free: 20 << 30},
		{ID: 1, CPUs: "0-1", Total: 1 << 20, Free: 512 << 10}}, readNUMA(fsys))
	require.Nil(t, readNUMA(fstest.MapFS{}), "a kernel without NUMA")
}

func TestReadKSM(t *testing.T) {
	h := testenv.DefaultFakeHost()
	require.Equal(t, KSM{Run: -1, MergeAcrossNodes: -1}, readKSM(h.FS()), "a kernel without KSM")
	h.KSM = map[string]string{"run": "1", "pages_shared": "2", "pages_sharing": "510", "merge_across_nodes": "1",
		"pages_to_scan": "100", "sleep_millisecs": "20"}
	require.Equal(t, KSM{Available: true, Run: 1, PagesShared: 2, PagesSharing: 510, MergeAcrossNodes: 1,
		PagesToScan: 100, SleepMillisecs: 20}, readKSM(h.FS()))
}

// The KSM advice: none while ksmd runs on one node; a stopped ksmd, a
// kernel without KSM, and merging across several nodes each say what to do.
func TestKSMAdvice(t *testing.T) {
	topics := func(f *Facts) []Topic {
		var out []Topic
		for _, a := range Advise(f) {
			if a.Topic == TopicKSM || a.Topic == TopicKSMNUMA {
				out = append(out, a.Topic)
			}
		}
		return out
	}
	one := []NUMANode{{ID: 0, Total: 1 << 30}}
	running := KSM{Available: true, Run: 1, MergeAcrossNodes: 1}
	require.Empty(t, topics(&Facts{KSM: running, NUMA: one}))
	require.Equal(t, []Topic{TopicKSM}, topics(&Facts{KSM: KSM{Available: true, MergeAcrossNodes: 1}, NUMA: one}))
	require.Equal(t, []Topic{TopicKSM}, topics(&Facts{KSM: KSM{Run: -1}, NUMA: one}))
	two := append(one, NUMANode{ID: 1, Total: 1 << 30})
	require.Equal(t, []Topic{TopicKSMNUMA}, topics(&Facts{KSM: running, NUMA: two}))
	running.MergeAcrossNodes = 0
	require.Empty(t, topics(&Facts{KSM: running, NUMA: two}))
}

func TestHugePoolsCheck(t *testing.T) {
	pools := HugePools{{PageSize: 2 << 20, Total: 100, Free: 60}}
	require.NoError(t, pools.Check(2<<20, 64<<20), "64 MiB from 60 free pages")
	err := pools.Check(2<<20, 256<<20)
	require.Error(t, err)
	for _, want := range []string{"the 2MiB pool has 60 free pages of 100", "256MiB needs 128",
		"(echo 168 > /proc/sys/vm/nr_hugepages)"} {
		require.Contains(t, err.Error(), want)
	}
	require.ErrorContains(t, pools.Check(1<<30, 1<<30), "this host has no 1GiB hugetlb pool")
	pools = append(pools, HugePool{PageSize: 1 << 30, Total: 4, Free: 4})
	err = pools.Check(1<<30, 1536<<20)
	require.ErrorContains(t, err, "1536MiB is not a multiple of the 1GiB page size")
	err = pools.Check(1<<30, 8<<30)
	require.ErrorContains(t, err, "the 1GiB pool has 4 free pages of 4, and 8GiB needs 8")
	require.False(t, strings.Contains(err.Error(), "nr_hugepages"), "a 1 GiB pool is reserved at boot: %v", err)

	// Free pages that other mappings reserved are not there for a new one.
	pools = HugePools{{PageSize: 2 << 20, Total: 30, Free: 30, Reserved: 8}}
	require.NoError(t, pools.Check(2<<20, 44<<20), "22 of the 22 unreserved pages")
	err = pools.Check(2<<20, 48<<20)
	require.ErrorContains(t, err, "the 2MiB pool has 30 free pages of 30 (8 of them reserved by other mappings), "+
		"and 48MiB needs 24 (echo 32 > /proc/sys/vm/nr_hugepages)")
}
