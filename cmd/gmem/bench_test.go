//go:build amd64

package main

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/gmem-vmm/gmem/host"
	"github.com/gmem-vmm/gmem/internal/bench"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

// runGmem runs the command in-process on this host.
func runGmem(t *testing.T, ctx context.Context, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(ctx, args, &out, &errb, os.DirFS("/"))
	return code, out.String(), errb.String()
}

func decodeReport(t *testing.T, s string) *bench.Report {
	t.Helper()
	var r bench.Report
	if err := json.Unmarshal([]byte(s), &r); err != nil {
		t.Fatalf("%v: %s", err, s)
	}
	return &r
}

func find(r *bench.Report, backing, method string) *bench.Result {
	for i := range r.Results {
		if r.Results[i].Backing == backing && r.Results[i].Method == method {
			return &r.Results[i]
		}
	}
	return nil
}

// TestBenchTiny runs a whole bench of a 64 MiB guest in-process: every
// strategy of three backings and the madvise and memset peers, one run
// each, and checks that each figure is there and each populate populated.
func TestBenchTiny(t *testing.T) {
	code, out, errOut := runGmem(t, context.Background(), "bench", "--sizes", "64M", "--runs", "1", "--warmup", "0",
		"--backings", "anon,anon-thp,memfd", "--peers", "madvise,memset", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	r := decodeReport(t, out)
	n := runtime.NumCPU()
	peers := 2
	if n > 1 {
		peers = 4
	}
	if want := 3*5 + 3*peers; len(r.Results) != want {
		t.Fatalf("%d results, want %d: %s", len(r.Results), want, out)
	}
	if r.Runs != 1 || r.Warmup != 0 || r.Workers != n || r.Interrupted {
		t.Errorf("report header %+v", r)
	}
	for _, b := range []string{"anon", "anon-thp", "memfd"} {
		none := find(r, b, "none")
		if none == nil || none.Map == nil || none.Prefault != nil || none.Teardown == nil || none.Resident != 0 {
			t.Errorf("%s none: %+v", b, none)
		}
		for _, m := range []string{"map-populate", "prefault x1", fmt.Sprintf("prefault x%d", n), "touch",
			"madvise x1", "memset x1"} {
			res := find(r, b, m)
			if res == nil {
				t.Errorf("no %s %s", b, m)
				continue
			}
			if res.Prefault == nil || res.Prefault.N != 1 || res.Prefault.Median <= 0 || res.GiBps <= 0 {
				t.Errorf("%s %s: %+v", b, m, res)
			}
			if res.Resident < 0.99 {
				t.Errorf("%s %s left %.0f%% resident", b, m, 100*res.Resident)
			}
			if wantPeer := strings.HasPrefix(m, "madvise") || strings.HasPrefix(m, "memset"); res.Peer != wantPeer {
				t.Errorf("%s %s: peer = %v", b, m, res.Peer)
			}
		}
		if res := find(r, b, "prefault x1"); res != nil && (res.Map == nil || res.Teardown == nil) {
			t.Errorf("%s prefault x1 lacks a phase: %+v", b, res)
		}
		if res := find(r, b, "map-populate"); res != nil && res.Map != nil {
			t.Errorf("map-populate has a separate map phase: %+v", res)
		}
	}
	if host.ReadTHP(os.DirFS("/")).Enabled != "never" {
		if res := find(r, "anon-thp", "prefault x1"); res == nil || res.Huge < 0.5 {
			t.Errorf("anon-thp prefault x1 is not backed by huge pages: %+v", res)
		}
		if res := find(r, "anon", "prefault x1"); res == nil || res.Huge != 0 {
			t.Errorf("anon without THP got huge pages: %+v", res)
		}
	}
}

// TestBenchCSV checks the CSV form of a real run: a header and one row per
// figure, all of the same width.
func TestBenchCSV(t *testing.T) {
	code, out, errOut := runGmem(t, context.Background(), "bench", "--sizes", "32M", "--runs", "2", "--warmup", "1",
		"--backings", "anon-thp", "--strategies", "prefault-1,none", "--peers", "madvise", "--workers", "1", "--csv")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	rows, err := csv.NewReader(strings.NewReader(out)).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	var header bytes.Buffer
	if err := bench.WriteCSV(&header, &bench.Report{}); err != nil {
		t.Fatal(err)
	}
	if len(rows) != 4 || strings.Join(rows[0], ",")+"\n" != header.String() {
		t.Fatalf("CSV:\n%s", out)
	}
	if rows[1][3] != "prefault x1" || rows[1][6] == "" || rows[3][3] != "madvise x1" {
		t.Errorf("rows: %v", rows)
	}
}

// TestBenchTableAndPlot runs a bench with the default output and a plot.
func TestBenchTableAndPlot(t *testing.T) {
	plot := filepath.Join(t.TempDir(), "bench.svg")
	code, out, errOut := runGmem(t, context.Background(), "bench", "--sizes", "32M", "--runs", "1", "--warmup", "0",
		"--backings", "anon-thp,memfd", "--strategies", "prefault-n", "--peers", "memset", "--plot", plot)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, want := range []string{"size", "32MiB", "anon-thp", "memfd", "prefault x", "peer: memset x1"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	if b, err := os.ReadFile(plot); err != nil || !bytes.Contains(b, []byte("<svg")) {
		t.Errorf("plot: %v", err)
	}
	if errOut != "" {
		t.Errorf("stderr not empty (no progress bar without a terminal): %q", errOut)
	}
}

// TestBenchInterrupted cancels a long bench part way, as Ctrl-C does: the
// command exits 130 and prints what it measured.
func TestBenchInterrupted(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(time.Second, cancel)
	code, out, errOut := runGmem(t, ctx, "bench", "--sizes", "32M", "--runs", "100000", "--warmup", "1",
		"--backings", "anon", "--strategies", "prefault-1,touch", "--peers", "madvise", "--json")
	if code != exitInterrupted {
		t.Fatalf("exit %d, want %d: %s", code, exitInterrupted, errOut)
	}
	if !strings.Contains(errOut, "interrupted") || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
		t.Errorf("stderr %q", errOut)
	}
	r := decodeReport(t, out)
	if !r.Interrupted || len(r.Results) != 1 || r.Results[0].Prefault == nil || r.Results[0].Prefault.N < 1 ||
		!strings.Contains(r.Results[0].Note, "interrupted") {
		t.Fatalf("report %+v", r)
	}
}

// TestErrorsAreOneLine checks that every refusal is one line on stderr and
// a non-zero exit, before anything is allocated.
func TestErrorsAreOneLine(t *testing.T) {
	small := defaultFakeHost()
	small.MemAvailKB = 1 << 20 // 1 GiB available
	for _, tc := range []struct {
		name string
		args []string
		root fakeHost
		code int
		want []string
	}{
		{"unknown flag", []string{"bench", "--bogus"}, defaultFakeHost(), exitUsage, []string{"unknown flag --bogus"}},
		{"unknown command", []string{"frobnicate"}, defaultFakeHost(), exitUsage, []string{"unexpected argument frobnicate"}},
		{"malformed size", []string{"bench", "--sizes", "4X"}, defaultFakeHost(), exitUsage,
			[]string{"--sizes", "unknown unit"}},
		{"decimal units", []string{"bench", "--sizes", "4GB"}, defaultFakeHost(), exitUsage, []string{"write G or GiB"}},
		{"unaligned size", []string{"bench", "--sizes", "3M"}, defaultFakeHost(), exitUsage,
			[]string{"3MiB is not a positive multiple of 2 MiB"}},
		{"too large", []string{"bench", "--sizes", "1G,4G"}, small, exitError,
			[]string{"size 4GiB (4294967296 bytes) is more than", "MemAvailable is 1.0 GiB (1073741824 bytes)"}},
		{"hugetlb without a pool", []string{"bench", "--sizes", "64M", "--backings", "hugetlb"}, defaultFakeHost(),
			exitError, []string{"backing hugetlb unavailable for 64MiB", "0 free pages", "nr_hugepages"}},
		{"missing QEMU", []string{"bench", "--sizes", "64M", "--peers", "qemu", "--qemu", "/nonexistent/qemu"},
			defaultFakeHost(), exitError, []string{"QEMU binary /nonexistent/qemu"}},
		{"unknown backing", []string{"bench", "--backings", "tmpfs"}, defaultFakeHost(), exitUsage,
			[]string{`--backings: unknown name "tmpfs"`}},
		{"bad plot", []string{"bench", "--plot", "x.pdf"}, defaultFakeHost(), exitUsage, []string{".svg or .png"}},
		{"json and csv", []string{"bench", "--json", "--csv"}, defaultFakeHost(), exitUsage,
			[]string{"--json and --csv can't be used together"}},
		{"no runs", []string{"bench", "--runs", "0"}, defaultFakeHost(), exitUsage, []string{"--runs 0"}},
		{"bad number", []string{"bench", "--runs", "five"}, defaultFakeHost(), exitUsage, []string{"--runs"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run(context.Background(), tc.args, &out, &errb, tc.root.FS())
			if code != tc.code {
				t.Errorf("exit %d, want %d (stderr %q)", code, tc.code, errb.String())
			}
			msg := errb.String()
			if strings.Count(msg, "\n") != 1 || !strings.HasPrefix(msg, "gmem: error: ") {
				t.Errorf("stderr is not one error line: %q", msg)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("stderr %q does not say %q", msg, w)
				}
			}
			if out.Len() != 0 {
				t.Errorf("stdout not empty: %q", out.String())
			}
		})
	}
}

func TestHelpExitsZero(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"bench", "--help"}, &out, &errb, defaultFakeHost().FS()); code != 0 {
		t.Fatalf("exit %d", code)
	}
	for _, flag := range []string{"--sizes", "--backings", "--strategies", "--peers", "--workers", "--runs", "--warmup",
		"--hugepage-size", "--qemu", "--kvm", "--json", "--csv", "--plot", "--no-progress"} {
		if !strings.Contains(out.String(), flag) {
			t.Errorf("help lacks %s", flag)
		}
	}
}

// A lazy guest (strategy none, no peers) populates nothing, so it may be
// larger than the host's available memory; anything that populates may not.
func TestBenchLazyGuestLargerThanMemory(t *testing.T) {
	testenv.KVM(t)
	small := defaultFakeHost()
	small.MemAvailKB = 1 << 20 // 1 GiB available
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"bench", "--sizes", "64G", "--strategies", "none", "--peers", "none",
		"--backings", "anon,memfd", "--runs", "1", "--warmup", "0", "--json"}, &out, &errb, small.FS())
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	r := decodeReport(t, out.String())
	if len(r.Results) != 2 {
		t.Fatalf("results: %+v", r.Results)
	}
	errb.Reset()
	code = run(context.Background(), []string{"bench", "--sizes", "64G", "--strategies", "none", "--peers", "madvise"},
		&out, &errb, small.FS())
	if code != exitError || !strings.Contains(errb.String(), "choose a smaller --sizes") {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
}

// --guest-touch: a vCPU writes every page after strategies none and
// prefault-n, and only there.
func TestBenchGuestTouch(t *testing.T) {
	testenv.KVM(t)
	code, out, errs := runGmem(t, context.Background(), "bench", "--sizes", "16M", "--backings", "anon,memfd",
		"--strategies", "none,prefault-1,prefault-n", "--peers", "none", "--runs", "1", "--warmup", "0", "--json",
		"--guest-touch", "on")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	r := decodeReport(t, out)
	for _, res := range r.Results {
		measured := res.Method == "none" || strings.HasPrefix(res.Method, "prefault x") && res.Method != "prefault x1"
		if (res.GuestTouch != nil) != measured {
			t.Errorf("%s %s: guest touch %+v", res.Backing, res.Method, res.GuestTouch)
		}
		if res.GuestTouch != nil && res.GuestTouch.Median <= 0 {
			t.Errorf("%s %s: guest touch not timed", res.Backing, res.Method)
		}
	}
	code, _, errs = runGmem(t, context.Background(), "bench", "--sizes", "128G", "--guest-touch", "on")
	if code != exitUsage || !strings.Contains(errs, "choose --sizes of at most") {
		t.Fatalf("exit %d: %s", code, errs)
	}
}
