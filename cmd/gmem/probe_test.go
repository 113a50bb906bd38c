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
)

// fakeProber is a host with KVM, no hugetlb pool, shmem THP off and an
// 8 MiB memlock limit, whose populate timing says memfd is 4x slower.
func fakeProber(h fakeHost) prober {
	return prober{
		root:  h.fs(),
		uname: func() (string, error) { return "Linux 6.18.0-test x86_64", nil },
		kvm: func() KVMReport {
			return KVMReport{Path: "/dev/kvm", Present: true, Usable: true, APIVersion: 12,
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

func adviceWith(p *Probe, substr string) string {
	for _, a := range p.Advice {
		if strings.Contains(a, substr) {
			return a
		}
	}
	return ""
}

func TestProbeFillsEveryField(t *testing.T) {
	h := defaultFakeHost()
	h.pools = map[string][2]int{"hugepages-2048kB": {16, 8}}
	p := probe(context.Background(), fakeProber(h))
	if p.Kernel != "Linux 6.18.0-test x86_64" || p.Memory.Available != 20<<30 || !p.KVM.Usable ||
		p.KVM.Caps.Memslots != 32764 || p.THP.ShmemEnabled != "never" || len(p.HugePools) != 1 ||
		p.HugePools[0].Free != 8 || p.Memlock.Soft != 8<<20 || !p.Memlock.CapIPCLock || p.Overcommit.Mode != 0 ||
		p.Overcommit.Meaning != "heuristic" || !p.PopulateWrite.Works || !p.MlockOnFault.Works ||
		p.PopulateCost.Ratio() != 4 {
		t.Fatalf("probe = %+v", p)
	}
}

func TestAdviceShmemCarriesTheMeasuredCost(t *testing.T) {
	p := probe(context.Background(), fakeProber(defaultFakeHost()))
	a := adviceWith(p, "Shmem hugepages are off")
	for _, want := range []string{"shmem_enabled=never", "4 KiB at a time", "10.0ms anonymous with THP", "40.0ms as a memfd",
		"4.0x longer", "echo advise"} {
		if !strings.Contains(a, want) {
			t.Errorf("shmem advice %q does not say %q", a, want)
		}
	}
	if adviceWith(p, "No hugetlb pool") == "" {
		t.Error("no advice about the missing hugetlb pool")
	}
	if a := adviceWith(p, "RLIMIT_MEMLOCK"); !strings.Contains(a, "CAP_IPC_LOCK, which exempts it") {
		t.Errorf("memlock advice for a CAP_IPC_LOCK process: %q", a)
	}
	if adviceWith(p, "/dev/kvm") != "" {
		t.Error("KVM advice on a host with KVM")
	}
}

func TestAdviceWithoutKVM(t *testing.T) {
	pr := fakeProber(defaultFakeHost())
	pr.kvm = func() KVMReport { return KVMReport{Path: "/dev/kvm", Error: "kvm: device not available"} }
	p := probe(context.Background(), pr)
	if a := adviceWith(p, "No /dev/kvm"); !strings.Contains(a, "modprobe kvm_intel") {
		t.Errorf("no-KVM advice: %q", a)
	}
	pr.kvm = func() KVMReport {
		return KVMReport{Path: "/dev/kvm", Present: true, Error: "kvm: permission denied: add the user to kvm"}
	}
	p = probe(context.Background(), pr)
	if a := adviceWith(p, "not usable"); !strings.Contains(a, "add the user to kvm") {
		t.Errorf("KVM permission advice: %q", a)
	}
}

func TestAdviceLowMemlockWithoutCapability(t *testing.T) {
	h := defaultFakeHost()
	h.capEff = "0000000000000000"
	p := probe(context.Background(), fakeProber(h))
	if a := adviceWith(p, "RLIMIT_MEMLOCK is 8.0 MiB"); !strings.Contains(a, "ulimit -l") {
		t.Errorf("low memlock advice: %q", a)
	}
	pr := fakeProber(h)
	pr.memlock = func() (int64, int64, error) { return -1, -1, nil }
	if p := probe(context.Background(), pr); adviceWith(p, "RLIMIT_MEMLOCK") != "" {
		t.Error("memlock advice with an unlimited limit")
	}
}

func TestAdviceForOtherHosts(t *testing.T) {
	h := defaultFakeHost()
	h.thpEnabled, h.thpDefrag, h.shmemEnabled = "always madvise [never]", "always defer defer+madvise madvise [never]",
		"always within_size [advise] never deny force"
	h.overcommit = "2"
	h.pools = map[string][2]int{"hugepages-2048kB": {64, 64}}
	pr := fakeProber(h)
	pr.populateWrite = func() error { return errors.New("madvise: invalid argument") }
	pr.mlockOnFault = func() error { return errors.New("mlock2: not implemented") }
	pr.measure = nil
	p := probe(context.Background(), pr)
	for _, want := range []string{"enabled=never", "overcommit_memory=2", "MADV_POPULATE_WRITE does not work",
		"LockOnFault will fail"} {
		if adviceWith(p, want) == "" {
			t.Errorf("no advice saying %q in %q", want, p.Advice)
		}
	}
	for _, not := range []string{"Shmem hugepages are off", "No hugetlb pool", "defrag"} {
		if a := adviceWith(p, not); a != "" {
			t.Errorf("unexpected advice %q", a)
		}
	}
	if p.PopulateCost != nil {
		t.Error("populate cost measured with measure == nil")
	}
}

func TestRenderProbe(t *testing.T) {
	p := probe(context.Background(), fakeProber(defaultFakeHost()))
	var b bytes.Buffer
	if err := renderProbe(&b, p); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"kernel                  Linux 6.18.0-test x86_64",
		"/dev/kvm                present, read-write, API version 12",
		"memory slots            32764",
		"guest_memfd             yes",
		"dirty ring              yes, up to 1.0 MiB",
		"shmem_enabled           never",
		"2MiB pages              0 free of 0",
		"RLIMIT_MEMLOCK          8.0 MiB soft, 8.0 MiB hard (not enforced: CAP_IPC_LOCK)",
		"overcommit_memory       0 (heuristic)",
		"MADV_POPULATE_WRITE     works",
		"memfd / anonymous       4.0x",
		"ADVICE\n  - ",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	if err := renderProbe(failingWriter{}, p); err == nil {
		t.Error("renderProbe hid a write error")
	}
}

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

func TestProbeJSONRoundTrips(t *testing.T) {
	p := probe(context.Background(), fakeProber(defaultFakeHost()))
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{`"kernel"`, `"memslots":32764`, `"shmem_enabled":"never"`, `"soft_bytes":8388608`,
		`"madv_populate_write":{"works":true}`, `"anon_thp_ns":10000000`, `"advice":[`} {
		if !bytes.Contains(b, []byte(key)) {
			t.Errorf("JSON lacks %s: %s", key, b)
		}
	}
	var back Probe
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.KVM.Caps.DirtyRingBytes != 1<<20 || back.PopulateCost.Memfd != 40*time.Millisecond ||
		len(back.Advice) != len(p.Advice) {
		t.Fatalf("round trip lost data: %+v", back)
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
	var p Probe
	if err := json.Unmarshal(out.Bytes(), &p); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	if p.Kernel == "" || p.Memory.Total == 0 || p.KVM.Path != "/dev/kvm" || p.PopulateCost != nil {
		t.Fatalf("probe = %+v", p)
	}
	if !p.PopulateWrite.Works && !strings.Contains(p.PopulateWrite.Error, "MADV_POPULATE_WRITE") {
		t.Errorf("populate check error %q", p.PopulateWrite.Error)
	}
}

// TestProbeMeasuresPopulate times a small populate of both backings on
// this host: the figures must be positive and anonymous memory must get
// huge pages where THP is on.
func TestProbeMeasuresPopulate(t *testing.T) {
	c, err := measurePopulate(context.Background(), 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	if c.AnonTHP <= 0 || c.Memfd <= 0 || c.Ratio() <= 0 {
		t.Fatalf("cost = %+v", c)
	}
	if readTHP(os.DirFS("/")).Enabled != "never" && c.AnonHuge == 0 {
		t.Errorf("no huge pages in anonymous memory that asked for THP: %+v", c)
	}
}
