//go:build amd64

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gmem-vmm/gmem/host"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

// sampleFacts is a host with KVM, empty hugetlb pools, shmem THP off and
// an 8 MiB memlock limit, whose populate timing says memfd is 4x slower.
func sampleFacts() *host.Facts {
	f := &host.Facts{
		Kernel: "Linux 6.18.0-test x86_64",
		Memory: host.MemInfo{Total: 24 << 30, Available: 20 << 30},
		KVM: host.KVM{Path: "/dev/kvm", Present: true, Usable: true, APIVersion: 12,
			Caps: &host.KVMCaps{Memslots: 32764, ReadonlyMem: true, UserMemory2: true, GuestMemfd: true,
				GuestMemfdFlags: "mmap|init-shared", GuestMemfdMmap: true, ManualDirtyLog: true, DirtyRingBytes: 1 << 20}},
		THP:           host.THPModes{Enabled: "madvise", Defrag: "madvise", ShmemEnabled: "never"},
		HugePools:     host.HugePools{{PageSize: 2 << 20}, {PageSize: 1 << 30}},
		Memlock:       host.Memlock{Soft: 8 << 20, Hard: 8 << 20, CapIPCLock: true},
		Overcommit:    host.Overcommit{Mode: 0, Meaning: "heuristic", Ratio: 50},
		PopulateWrite: host.Check{Works: true},
		MlockOnFault:  host.Check{Works: true},
		PopulateCost: &host.PopulateCost{Size: 64 << 20, AnonTHP: 10 * time.Millisecond,
			Memfd: 40 * time.Millisecond, AnonHuge: 1, Method: "test"},
	}
	f.Advice = host.Advise(f)
	return f
}

func adviceWith(f *host.Facts, substr string) string {
	for _, a := range f.Advice {
		if strings.Contains(a.Text, substr) {
			return a.Text
		}
	}
	return ""
}

func TestRenderProbe(t *testing.T) {
	var b bytes.Buffer
	if err := renderProbe(&b, sampleFacts()); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"kernel                  Linux 6.18.0-test x86_64",
		"/dev/kvm                present, read-write, API version 12",
		"memory slots            32764",
		"guest_memfd             yes",
		"guest_memfd flags       mmap|init-shared (the host can map it: guestmem.WithGuestMemfd, --backings gmem)",
		"guest_memfd can be mapped by the host (flags mmap|init-shared): guestmem.WithGuestMemfd",
		"dirty ring              yes, up to 1.0 MiB",
		"shmem_enabled           never",
		"2MiB pages              0 free of 0",
		"RLIMIT_MEMLOCK          8.0 MiB soft, 8.0 MiB hard (not enforced: CAP_IPC_LOCK)",
		"overcommit_memory       0 (heuristic)",
		"MADV_POPULATE_WRITE     works",
		"anonymous + THP         10.0ms (6.2 GiB/s, 100% huge)",
		"memfd                   40.0ms (1.6 GiB/s, 0% huge)",
		"memfd / anonymous       4.0x",
		"ADVICE\n  - Shmem hugepages are off (shmem_enabled=never)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	f := sampleFacts()
	f.NUMA = []host.NUMANode{{ID: 0, CPUs: "0-1", Total: 8 << 30, Free: 6 << 30}, {ID: 1, Total: 4 << 30, Free: 4 << 30}}
	f.KSM = host.KSM{Available: true, Run: 1, PagesShared: 2, PagesSharing: 510, MergeAcrossNodes: 1,
		PagesToScan: 100, SleepMillisecs: 20}
	b.Reset()
	if err := renderProbe(&b, f); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"NUMA NODES\n  node 0                  6.0 GiB free of 8.0 GiB, CPUs 0-1\n  node 1                  4.0 GiB free of 4.0 GiB, CPUs none",
		"KSM\n  ksmd                    run=1 (running), 100 pages every 20 ms",
		"merged                  510 pages into 2",
		"merge_across_nodes      1",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
	b.Reset()
	if err := renderProbe(&b, sampleFacts()); err != nil || !strings.Contains(b.String(), "KSM\n  (absent)") {
		t.Errorf("a kernel without KSM: %v\n%s", err, b.String())
	}
	if err := renderProbe(failingWriter{}, sampleFacts()); err == nil {
		t.Error("renderProbe hid a write error")
	}
}

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

// The advice gmem prints says what it means for gmem bench, where package
// host's says only what it means for guests.
func TestGmemAdviceNamesTheBench(t *testing.T) {
	f := sampleFacts()
	f.KVM = host.KVM{Path: "/dev/kvm"}
	f.Advice = host.Advise(f)
	var got []string
	for _, a := range f.Advice {
		got = append(got, gmemAdvice(f, a))
	}
	noKVM, noPool := got[0], got[2]
	if !strings.HasPrefix(noKVM, "No /dev/kvm: guests cannot run here. /dev/kvm does not exist") ||
		!strings.HasSuffix(noKVM, "nested virtualization if this is a VM. gmem bench will skip KVM registration and "+
			"the gokvm peer.") {
		t.Errorf("no-KVM advice %q", noKVM)
	}
	if want := "No hugetlb pool: the hugetlb backing is unavailable (gmem bench skips it). Reserve one with echo N > " +
		"/proc/sys/vm/nr_hugepages (N 2 MiB pages), or hugepagesz=1G hugepages=N on the kernel command line."; noPool != want {
		t.Errorf("hugetlb advice %q, want %q", noPool, want)
	}
	f.KVM = host.KVM{Path: "/dev/kvm", Present: true, Error: "kvm: permission denied"}
	a := host.Advise(f)[0]
	if got := gmemAdvice(f, a); got != a.Text {
		t.Errorf("advice on a KVM that is present changed to %q", got)
	}
}

// TestProbeCommandOnThisHost runs gmem probe for real, as a user would,
// without the populate timing.
func TestProbeCommandOnThisHost(t *testing.T) {
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"probe", "--json", "--no-measure"}, &out, &errb, os.DirFS("/"))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	var f host.Facts
	if err := json.Unmarshal(out.Bytes(), &f); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	if f.Kernel == "" || f.Memory.Total == 0 || f.KVM.Path != "/dev/kvm" || f.PopulateCost != nil {
		t.Fatalf("probe = %+v", f)
	}
	if !f.PopulateWrite.Works && !strings.Contains(f.PopulateWrite.Error, "MADV_POPULATE_WRITE") {
		t.Errorf("populate check error %q", f.PopulateWrite.Error)
	}
	if !f.KVM.Present && !strings.HasSuffix(adviceWith(&f, "No /dev/kvm"), "gmem bench will skip KVM registration "+
		"and the gokvm peer.") {
		t.Errorf("no gmem advice on the missing /dev/kvm: %q", f.Advice)
	}
}

// TestProbeCommandTable runs gmem probe with a small populate timing and
// reads its table; a root without /proc/meminfo is refused first.
func TestProbeCommandTable(t *testing.T) {
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"probe", "--measure-size", "4M"}, &out, &errb, os.DirFS("/"))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	for _, want := range []string{"HOST\n  kernel", "HUGETLB POOLS\n", "POPULATE COST (4.0 MiB, ", "ADVICE\n"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
	h := testenv.DefaultFakeHost()
	h.MemAvailKB = 2 << 10
	out.Reset()
	errb.Reset()
	if code := run(context.Background(), []string{"probe"}, &out, &errb, h.FS()); code != exitError ||
		!strings.Contains(errb.String(), "choose a smaller --measure-size") {
		t.Errorf("64 MiB timing with 2 MiB available: exit %d, %q", code, errb.String())
	}
}
