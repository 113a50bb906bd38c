//go:build amd64

package bench

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/internal/units"
)

// measure runs a plan of cfg, on this host, with one run of each figure
// unless cfg says otherwise.
func measure(t *testing.T, cfg Config) *Report {
	t.Helper()
	if cfg.Root == nil {
		cfg.Root = os.DirFS("/")
	}
	if cfg.Runs == 0 {
		cfg.Runs = 1
	}
	if cfg.Workers == 0 {
		cfg.Workers = 1
	}
	if cfg.HugepageSize == 0 {
		cfg.HugepageSize = 2 << 20
	}
	if cfg.KVMPath == "" {
		cfg.KVMPath = kvmPath
	}
	if cfg.GuestTouch == "" {
		cfg.GuestTouch = "off"
	}
	p, err := New(cfg)
	require.NoError(t, err)
	defer p.Close()
	r, err := p.Run(context.Background())
	require.NoError(t, err)
	return r
}

const kvmPath = "/dev/kvm"

func find(r *Report, backing, method string) *Result {
	for i := range r.Results {
		if r.Results[i].Backing == backing && r.Results[i].Method == method {
			return &r.Results[i]
		}
	}
	return nil
}

// TestBenchRegistersWithKVM checks the KVM registration phase and the
// gokvm peer, and that the gokvm peer leaves no VM, vCPU or guest RAM
// behind although machine.Machine has no Close.
func TestBenchRegistersWithKVM(t *testing.T) {
	testenv.KVM(t)
	before, err := snapshotProc()
	require.NoError(t, err)
	r := measure(t, Config{Sizes: []units.Size{64 * units.MiB}, Runs: 2, Backings: []string{BackingAnonTHP},
		Strategies: []string{StrategyNone, StrategyPrefault1, StrategyMapPopulate}, Peers: []string{PeerGokvm},
		ExplicitPeers: true})
	for _, m := range []string{"none", "prefault x1", "map-populate"} {
		res := find(r, "anon-thp", m)
		if res == nil || res.Register == nil || res.Register.Median <= 0 || res.Register.N != 2 {
			t.Errorf("%s: no KVM registration figure: %+v", m, res)
		}
	}
	g := find(r, "shmem", "gokvm machine.New")
	if g == nil || g.Prefault == nil || g.Prefault.Median <= 0 || g.Teardown == nil || g.Resident < 0.95 {
		t.Fatalf("gokvm: %+v (notes %v)", g, r.Notes)
	}
	after, err := snapshotProc()
	require.NoError(t, err)
	for fd, target := range after.fds {
		if strings.HasPrefix(target, "anon_inode:kvm-") && before.fds[fd] != target {
			t.Errorf("fd %d (%s) left open", fd, target)
		}
	}
	if v, ok := after.newShared(before, uint64(64*units.MiB)); ok {
		t.Errorf("gokvm's guest RAM is still mapped: %+v", v)
	}
}

// Without KVM, registration is not measured and the gokvm peer is skipped
// with a note, unless it was asked for.
func TestBenchWithoutKVM(t *testing.T) {
	cfg := Config{Sizes: []units.Size{32 * units.MiB}, Backings: []string{BackingAnon},
		Strategies: []string{StrategyPrefault1}, Peers: []string{PeerGokvm}, KVMPath: "/nonexistent/kvm"}
	r := measure(t, cfg)
	require.Len(t, r.Results, 1)
	require.Nil(t, r.Results[0].Register)
	require.Contains(t, r.Notes[0], "KVM registration not measured, gokvm peer skipped: kvm: device not available")

	cfg.ExplicitPeers, cfg.Root, cfg.Runs, cfg.Workers = true, os.DirFS("/"), 1, 1
	_, err := New(cfg)
	require.ErrorContains(t, err, "peer gokvm needs KVM")
}

// fakeQEMU writes a script that behaves like QEMU's monitor on stdio and
// logs its arguments: enough to test the QEMU peer without QEMU.
func fakeQEMU(t *testing.T, body string) (bin, log string) {
	dir := t.TempDir()
	bin, log = filepath.Join(dir, "qemu-system-x86_64"), filepath.Join(dir, "args")
	script := "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'QEMU emulator version 0.0 (fake)'; exit 0; fi\n" +
		"echo \"$@\" >> " + log + "\n" + body
	require.NoError(t, os.WriteFile(bin, []byte(script), 0o755))
	return bin, log
}

func TestBenchQEMUPeerWithAFakeQEMU(t *testing.T) {
	bin, log := fakeQEMU(t, "echo 'QEMU 0.0 monitor'\nprintf '(qemu) '\nread cmd\n[ \"$cmd\" = quit ] || exit 3\n")
	r := measure(t, Config{Sizes: []units.Size{32 * units.MiB}, Runs: 2,
		Backings: []string{BackingAnonTHP, BackingMemfd, BackingAnon}, Strategies: []string{StrategyNone},
		Peers: []string{PeerQEMU}, ExplicitPeers: true, QEMU: bin, Workers: 2})
	if r.Host.QEMU != "QEMU emulator version 0.0 (fake)" {
		t.Errorf("QEMU version %q", r.Host.QEMU)
	}
	for _, b := range []string{"anon-thp", "memfd"} {
		res := find(r, b, "qemu prealloc x2")
		if res == nil || res.Prefault == nil || res.Prefault.N != 2 || !strings.Contains(res.Note, "subtracted") {
			t.Errorf("%s: %+v", b, res)
		}
	}
	if find(r, "anon", "qemu prealloc x2") != nil {
		t.Error("a QEMU figure for anon, which QEMU has no backend for")
	}
	args, err := os.ReadFile(log)
	require.NoError(t, err)
	for _, want := range []string{
		"-machine none -nodefaults -no-user-config -display none -S -object " +
			"memory-backend-ram,id=m,size=33554432,prealloc=on,prealloc-threads=2 -monitor stdio",
		"memory-backend-ram,id=m,size=33554432,prealloc=off",
		"memory-backend-memfd,id=m,size=33554432,prealloc=on,prealloc-threads=2",
	} {
		if !strings.Contains(string(args), want) {
			t.Errorf("QEMU was never started with %q:\n%s", want, args)
		}
	}
	// 2 backings x (1 page-cache warm-up + 3 baseline + 2 runs).
	if n := strings.Count(string(args), "\n"); n != 2*(1+qemuBaselineRuns+2) {
		t.Errorf("QEMU started %d times", n)
	}
}

func TestBenchQEMUThatFailsIsANote(t *testing.T) {
	bin, _ := fakeQEMU(t, "echo 'qemu-system-x86_64: cannot allocate memory' >&2\nexit 1\n")
	r := measure(t, Config{Sizes: []units.Size{32 * units.MiB}, Backings: []string{BackingAnonTHP},
		Strategies: []string{StrategyNone}, Peers: []string{PeerQEMU}, ExplicitPeers: true, QEMU: bin})
	found := false
	for _, n := range r.Notes {
		found = found || strings.Contains(n, "exited before its monitor prompt: qemu-system-x86_64: cannot allocate memory")
	}
	if !found {
		t.Errorf("notes %q do not report QEMU's failure", r.Notes)
	}
}

// Progress hears of every run, done or skipped, so that a bar ends full.
func TestBenchProgress(t *testing.T) {
	var runs int
	var figures []string
	measure(t, Config{Sizes: []units.Size{32 * units.MiB}, Runs: 2, Warmup: 1, Backings: []string{BackingAnon},
		Strategies: []string{StrategyNone, StrategyPrefault1}, Progress: func(n int, figure string) {
			if n == 0 {
				figures = append(figures, figure)
			}
			runs += n
		}})
	require.Equal(t, []string{"32MiB anon none", "32MiB anon prefault x1"}, figures)
	require.Equal(t, 6, runs)

	// A peer that fails accounts for the runs it will not make.
	bin, _ := fakeQEMU(t, "exit 1\n")
	runs = 0
	cfg := Config{Sizes: []units.Size{32 * units.MiB}, Runs: 2, Warmup: 1, Backings: []string{BackingAnonTHP},
		Strategies: []string{StrategyNone}, Peers: []string{PeerQEMU}, QEMU: bin, Workers: 1, Root: os.DirFS("/"),
		KVMPath: kvmPath, Progress: func(n int, _ string) { runs += n }}
	p, err := New(cfg)
	require.NoError(t, err)
	defer p.Close()
	_, err = p.Run(context.Background())
	require.NoError(t, err)
	require.Equal(t, 6, p.Total())
	require.Equal(t, 3, p.Done())
	require.Equal(t, 6, runs)
}

func TestPopulates(t *testing.T) {
	require.False(t, Populates([]string{StrategyNone}, nil))
	require.True(t, Populates([]string{StrategyNone}, []string{PeerMemset}))
	require.True(t, Populates([]string{StrategyNone, StrategyTouch}, nil))
}

func TestSplitRange(t *testing.T) {
	for _, tc := range []struct {
		n, granule uint64
		parts      int
		want       [][2]uint64
	}{
		{8 << 20, 2 << 20, 2, [][2]uint64{{0, 4 << 20}, {4 << 20, 8 << 20}}},
		{6 << 20, 2 << 20, 2, [][2]uint64{{0, 4 << 20}, {4 << 20, 6 << 20}}},
		{2 << 20, 2 << 20, 4, [][2]uint64{{0, 2 << 20}}},
		{10, 4096, 0, [][2]uint64{{0, 10}}},
	} {
		require.Equal(t, tc.want, splitRange(tc.n, tc.granule, tc.parts), "splitRange(%d, %d, %d)", tc.n, tc.granule,
			tc.parts)
	}
}

func TestQEMUArgs(t *testing.T) {
	huge, _ := backingByName(BackingHugetlb, 2<<20)
	args, ok := qemuArgs(units.GiB, huge, 4, true, "kvm")
	if !ok || strings.Join(args, " ") != "-accel kvm -machine none -nodefaults -no-user-config -display none -S "+
		"-object memory-backend-memfd,id=m,size=1073741824,hugetlb=on,hugetlbsize=2097152,prealloc=on,prealloc-threads=4 "+
		"-monitor stdio" {
		t.Errorf("qemuArgs = %q", args)
	}
	anon, _ := backingByName(BackingAnon, 0)
	if _, ok := qemuArgs(units.GiB, anon, 1, false, "tcg"); ok {
		t.Error("QEMU args for plain anonymous memory")
	}
}

func TestWaitForPrompt(t *testing.T) {
	if !waitForPrompt(strings.NewReader("QEMU 7.2 monitor - type 'help'\n(qemu) "), "(qemu)") {
		t.Error("prompt not seen")
	}
	if waitForPrompt(strings.NewReader(strings.Repeat("x", 10000)+"(qem"), "(qemu)") {
		t.Error("prompt seen in output without it")
	}
}
