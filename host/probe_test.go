package host

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/internal/testenv"
)

// fakeProber is a host with KVM, no hugetlb pool, shmem THP off and an
// 8 MiB memlock limit, whose populate timing says memfd is 4x slower.
func fakeProber(h testenv.FakeHost) prober {
	return prober{
		root:  h.FS(),
		uname: func() (string, error) { return "Linux 6.18.0-test x86_64", nil },
		kvm: func() KVM {
			return KVM{Path: "/dev/kvm", Present: true, Usable: true, APIVersion: 12,
				Caps: &KVMCaps{Memslots: 32764, ReadonlyMem: true, UserMemory2: true, GuestMemfd: true,
					ManualDirtyLog: true, DirtyRingBytes: 1 << 20}}
		},
		memlock:       func() (int64, int64, error) { return 8 << 20, 8 << 20, nil },
		populateWrite: func() error { return nil },
		mlockOnFault:  func() error { return nil },
		measure: func(context.Context) (*PopulateCost, error) {
			return &PopulateCost{Size: 64 << 20, AnonTHP: 10 * time.Millisecond, Memfd: 40 * time.Millisecond,
				AnonHuge: 1, Method: "test"}, nil
		},
	}
}

// adviceOn returns the advice on topic t, or "".
func adviceOn(f *Facts, t Topic) string {
	for _, a := range f.Advice {
		if a.Topic == t {
			return a.Text
		}
	}
	return ""
}

func TestProbeFillsEveryField(t *testing.T) {
	h := testenv.DefaultFakeHost()
	h.Pools = map[string][]int{"hugepages-2048kB": {16, 8, 2, 1}}
	f := probe(context.Background(), fakeProber(h))
	require.Equal(t, "Linux 6.18.0-test x86_64", f.Kernel)
	require.Equal(t, uint64(20<<30), f.Memory.Available)
	require.True(t, f.KVM.Usable)
	require.Equal(t, 32764, f.KVM.Caps.Memslots)
	require.Equal(t, "never", f.THP.ShmemEnabled)
	require.Equal(t, HugePools{{PageSize: 2 << 20, Total: 16, Free: 8, Reserved: 2, Surplus: 1}}, f.HugePools)
	require.Equal(t, []NUMANode{{ID: 0, CPUs: "0-1", Total: 24 << 30, Free: 20 << 30}}, f.NUMA)
	require.Equal(t, Memlock{Soft: 8 << 20, Hard: 8 << 20, CapIPCLock: true}, f.Memlock)
	require.Equal(t, Overcommit{Mode: 0, Meaning: "heuristic", Ratio: 50}, f.Overcommit)
	require.Equal(t, Check{Works: true}, f.PopulateWrite)
	require.Equal(t, Check{Works: true}, f.MlockOnFault)
	require.Equal(t, 4.0, f.PopulateCost.Ratio())
}

func TestAdviceShmemCarriesTheMeasuredCost(t *testing.T) {
	f := probe(context.Background(), fakeProber(testenv.DefaultFakeHost()))
	a := adviceOn(f, TopicShmemHugepages)
	for _, want := range []string{"Shmem hugepages are off (shmem_enabled=never)", "4 KiB at a time",
		"10.0ms anonymous with THP", "40.0ms as a memfd", "4.0x longer", "echo advise"} {
		require.Contains(t, a, want)
	}
	require.Equal(t, "No hugetlb pool: the hugetlb backing is unavailable. Reserve one with echo N > "+
		"/proc/sys/vm/nr_hugepages (N 2 MiB pages), or hugepagesz=1G hugepages=N on the kernel command line.",
		adviceOn(f, TopicHugetlbPool))
	require.Contains(t, adviceOn(f, TopicMemlock), "CAP_IPC_LOCK, which exempts it")
	require.Empty(t, adviceOn(f, TopicKVM), "KVM advice on a host with KVM")
	require.Empty(t, adviceOn(f, TopicMeasure))
}

func TestAdviceWithoutKVM(t *testing.T) {
	pr := fakeProber(testenv.DefaultFakeHost())
	pr.kvm = func() KVM { return KVM{Path: "/dev/kvm", Error: "kvm: device not available"} }
	a := adviceOn(probe(context.Background(), pr), TopicKVM)
	require.True(t, strings.HasPrefix(a, "No /dev/kvm: guests cannot run here. /dev/kvm does not exist"), a)
	require.Contains(t, a, "modprobe kvm_intel")
	require.True(t, strings.HasSuffix(a, "nested virtualization if this is a VM."), a)

	pr.kvm = func() KVM {
		return KVM{Path: "/dev/kvm", Present: true, Error: "kvm: permission denied: add the user to kvm"}
	}
	require.Equal(t, "/dev/kvm is present but not usable: kvm: permission denied: add the user to kvm",
		adviceOn(probe(context.Background(), pr), TopicKVM))

	pr = fakeProber(testenv.DefaultFakeHost())
	pr.kvm = func() KVM { return KVM{Path: "/dev/kvm", Present: true, Usable: true, Caps: &KVMCaps{}} }
	require.Contains(t, adviceOn(probe(context.Background(), pr), TopicDirtyTracking), "neither manual dirty-log")
}

func TestAdviceLowMemlockWithoutCapability(t *testing.T) {
	h := testenv.DefaultFakeHost()
	h.CapEff = "0000000000000000"
	a := adviceOn(probe(context.Background(), fakeProber(h)), TopicMemlock)
	require.Contains(t, a, "RLIMIT_MEMLOCK is 8.0 MiB")
	require.Contains(t, a, "ulimit -l")
	pr := fakeProber(h)
	pr.memlock = func() (int64, int64, error) { return -1, -1, nil }
	require.Empty(t, adviceOn(probe(context.Background(), pr), TopicMemlock), "advice with an unlimited limit")
}

func TestAdviceForOtherHosts(t *testing.T) {
	h := testenv.DefaultFakeHost()
	h.THPEnabled, h.THPDefrag, h.ShmemEnabled = "always madvise [never]", "always defer defer+madvise madvise [never]",
		"always within_size [advise] never deny force"
	h.Overcommit = "2"
	h.Pools = map[string][]int{"hugepages-2048kB": {64, 64}}
	pr := fakeProber(h)
	pr.populateWrite = func() error { return errors.New("madvise: invalid argument") }
	pr.mlockOnFault = func() error { return errors.New("mlock2: not implemented") }
	pr.measure = nil
	f := probe(context.Background(), pr)
	for topic, want := range map[Topic]string{
		TopicTHP:           "enabled=never",
		TopicOvercommit:    "overcommit_memory=2 (strict): MAP_NORESERVE is ignored",
		TopicPopulateWrite: "MADV_POPULATE_WRITE does not work here (madvise: invalid argument)",
		TopicMlockOnFault:  "LockOnFault will fail",
	} {
		require.Contains(t, adviceOn(f, topic), want)
	}
	for _, not := range []Topic{TopicShmemHugepages, TopicHugetlbPool, TopicTHPDefrag} {
		require.Empty(t, adviceOn(f, not))
	}
	require.Nil(t, f.PopulateCost, "populate cost measured with measure == nil")

	// THP on, but compaction off, and the measured memory got few huge pages.
	h.THPEnabled, h.THPDefrag = "[always] madvise never", "always [defer] defer+madvise madvise never"
	pr = fakeProber(h)
	pr.measure = func(context.Context) (*PopulateCost, error) {
		return &PopulateCost{Size: 64 << 20, AnonTHP: 1, Memfd: 1, AnonHuge: 0.2, MemfdHuge: 0.1}, nil
	}
	f = probe(context.Background(), pr)
	require.Contains(t, adviceOn(f, TopicTHPDefrag), "THP defrag=defer")
	require.Contains(t, adviceOn(f, TopicShmemHugepages), "only 10% of the measured memfd")
	require.Contains(t, adviceOn(f, TopicFragmentation), "Only 20% of the anonymous memory")
}

func TestAdviceOnAFailedMeasureComesLast(t *testing.T) {
	pr := fakeProber(testenv.DefaultFakeHost())
	pr.measure = func(context.Context) (*PopulateCost, error) { return nil, errors.New("memfd: no space") }
	f := probe(context.Background(), pr)
	require.Equal(t, Advice{Topic: TopicMeasure, Text: "Timing the populate of anonymous and memfd memory failed: " +
		"memfd: no space"}, f.Advice[len(f.Advice)-1])

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	pr.measure = func(context.Context) (*PopulateCost, error) { panic("measured after ctx was done") }
	require.Empty(t, adviceOn(probe(ctx, pr), TopicMeasure))
}

func TestFactsJSONRoundTrips(t *testing.T) {
	f := probe(context.Background(), fakeProber(testenv.DefaultFakeHost()))
	b, err := json.Marshal(f)
	require.NoError(t, err)
	for _, key := range []string{`"kernel"`, `"memslots":32764`, `"shmem_enabled":"never"`, `"soft_bytes":8388608`,
		`"madv_populate_write":{"works":true}`, `"anon_thp_ns":10000000`, `"advice":["`, `"reserved_pages":0`,
		`"ratio":50`, `"numa_nodes":[{"id":0`} {
		require.True(t, bytes.Contains(b, []byte(key)), "JSON lacks %s: %s", key, b)
	}
	var back Facts
	require.NoError(t, json.Unmarshal(b, &back))
	require.Equal(t, 1<<20, back.KVM.Caps.DirtyRingBytes)
	require.Equal(t, 40*time.Millisecond, back.PopulateCost.Memfd)
	require.Len(t, back.Advice, len(f.Advice))
	for i := range f.Advice {
		require.Equal(t, f.Advice[i].Text, back.Advice[i].Text)
	}
}

func TestProbeRefusesAnUnalignedMeasureSize(t *testing.T) {
	_, err := Probe(context.Background(), Options{MeasureSize: 3 << 20})
	require.ErrorContains(t, err, "host: MeasureSize 3145728 is not a multiple of 2 MiB")
}

// TestProbeThisHost probes the machine the test runs on, without the
// populate timing.
func TestProbeThisHost(t *testing.T) {
	f, err := Probe(context.Background(), Options{KVMPath: "/nonexistent/kvm"})
	require.NoError(t, err)
	require.NotEmpty(t, f.Kernel)
	require.NotZero(t, f.Memory.Total)
	require.Equal(t, KVM{Path: "/nonexistent/kvm", Error: f.KVM.Error}, f.KVM)
	require.Contains(t, adviceOn(f, TopicKVM), "No /nonexistent/kvm")
	require.Nil(t, f.PopulateCost)
	if !f.PopulateWrite.Works {
		require.Contains(t, f.PopulateWrite.Error, "MADV_POPULATE_WRITE")
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	f, err = Probe(ctx, Options{MeasureSize: 2 << 20})
	require.ErrorIs(t, err, context.Canceled)
	require.NotNil(t, f, "what was found before ctx was done")
	require.Nil(t, f.PopulateCost)
}

// TestMeasurePopulate times a small populate of both backings on this
// host: the figures must be positive and anonymous memory must get huge
// pages where THP is on.
func TestMeasurePopulate(t *testing.T) {
	c, err := measurePopulate(context.Background(), 8<<20)
	require.NoError(t, err)
	require.Positive(t, c.AnonTHP)
	require.Positive(t, c.Memfd)
	require.Positive(t, c.Ratio())
	if ReadTHP(os.DirFS("/")).Enabled != "never" {
		require.NotZero(t, c.AnonHuge, "no huge pages in anonymous memory that asked for THP: %+v", c)
	}
}

func TestTouchPagesStopsWithCtx(t *testing.T) {
	b := make([]byte, 3*4096)
	require.NoError(t, touchPages(context.Background(), b))
	require.Equal(t, byte(1), b[2*4096])
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, touchPages(ctx, make([]byte, 4096)), context.Canceled)
}
