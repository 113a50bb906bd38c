//go:build amd64

package bench

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/gmem-vmm/gmem/host"
)

// sampleReport is a report with a gmem strategy, a strategy without a
// prefault, and a peer.
func sampleReport() *Report {
	sum := func(med time.Duration) *Summary {
		return &Summary{N: 5, Median: med, Min: med - 1, Max: med + 1, Cold: 2 * med}
	}
	return &Report{
		Command: "gmem bench --sizes 1G", Runs: 5, Warmup: 1, Workers: 2,
		Host: Host{Kernel: "Linux test", CPUs: 2, Memory: 24 << 30,
			THP: host.THPModes{Enabled: "madvise", Defrag: "madvise", ShmemEnabled: "never"}},
		Results: []Result{
			{Size: 1 << 30, SizeText: "1GiB", Backing: "anon-thp", Method: "prefault x2", Workers: 2,
				Map: sum(40 * time.Microsecond), Register: sum(100 * time.Microsecond),
				Prefault: sum(50 * time.Millisecond), Teardown: sum(time.Millisecond), Setup: sum(51 * time.Millisecond),
				GiBps: 20, Huge: 1, Resident: 1},
			{Size: 1 << 30, SizeText: "1GiB", Backing: "anon-thp", Method: "none", Workers: 1,
				Map: sum(40 * time.Microsecond), Register: sum(100 * time.Microsecond), Teardown: sum(time.Microsecond),
				Setup: sum(140 * time.Microsecond)},
			{Size: 1 << 30, SizeText: "1GiB", Backing: "memfd", Method: "qemu prealloc x2", Peer: true, Workers: 2,
				Prefault: sum(600 * time.Millisecond), Setup: sum(600 * time.Millisecond), GiBps: 1.7,
				Note: "QEMU start subtracted, with, a comma"},
		},
		Notes: []string{"hugetlb skipped"},
	}
}

func TestCSV(t *testing.T) {
	var b bytes.Buffer
	if err := WriteCSV(&b, sampleReport()); err != nil {
		t.Fatal(err)
	}
	rows, err := csv.NewReader(&b).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 4 {
		t.Fatalf("%d rows, want a header and 3", len(rows))
	}
	head := rows[0]
	col := func(name string) int {
		for i, h := range head {
			if h == name {
				return i
			}
		}
		t.Fatalf("no column %s in %v", name, head)
		return -1
	}
	for i, r := range rows {
		if len(r) != len(head) {
			t.Errorf("row %d has %d fields, header %d", i, len(r), len(head))
		}
	}
	g, none, peer := rows[1], rows[2], rows[3]
	if g[col("size_bytes")] != "1073741824" || g[col("backing")] != "anon-thp" || g[col("peer")] != "false" ||
		g[col("prefault_median_ns")] != "50000000" || g[col("prefault_cold_ns")] != "100000000" ||
		g[col("prefault_n")] != "5" || g[col("gib_per_s")] != "20.000" || g[col("huge_fraction")] != "1.000" {
		t.Errorf("gmem row %v", g)
	}
	if none[col("prefault_median_ns")] != "" || none[col("map_median_ns")] != "40000" {
		t.Errorf("a missing phase must be empty: %v", none)
	}
	if peer[col("peer")] != "true" || peer[col("map_median_ns")] != "" || peer[col("note")] != "QEMU start subtracted, with, a comma" {
		t.Errorf("peer row %v", peer)
	}
}

func TestJSONRoundTrips(t *testing.T) {
	var b bytes.Buffer
	rep := sampleReport()
	if err := WriteJSON(&b, rep); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{`"size_bytes": 1073741824`, `"median_ns": 50000000`, `"cold_ns": 100000000`,
		`"gib_per_s": 20`, `"peer": true`} {
		if !strings.Contains(b.String(), key) {
			t.Errorf("JSON lacks %s", key)
		}
	}
	var back Report
	if err := json.Unmarshal(b.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if len(back.Results) != 3 || back.Results[1].Prefault != nil || *back.Results[0].Prefault != *rep.Results[0].Prefault ||
		back.Results[2].Map != nil || back.Notes[0] != "hugetlb skipped" || back.Host.THP.ShmemEnabled != "never" {
		t.Fatalf("round trip: %+v", back)
	}
	// No results still gives arrays, not null.
	b.Reset()
	if err := WriteJSON(&b, &Report{}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), `"results": []`) || !strings.Contains(b.String(), `"notes": []`) {
		t.Errorf("empty report: %s", b.String())
	}
}

func TestTable(t *testing.T) {
	var b bytes.Buffer
	if err := WriteTable(&b, sampleReport()); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"median of 5 runs after 1 warm-up",
		"prefault [min-max]",
		"50.0ms [50.0ms-50.0ms]",
		"peer: qemu prealloc x2",
		"20.00",
		"100%",
		"notes:\n  - 1GiB memfd qemu prealloc x2: QEMU start",
		"  - hugetlb skipped",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

func TestPlotWritesSVGAndPNG(t *testing.T) {
	rep := sampleReport()
	c := chartData(rep)
	if len(c.groups) != 2 || len(c.series) != 2 || c.values[0][0] != 20 || c.values[1][1] != 1.7 || c.values[0][1] != 0 {
		t.Fatalf("chartData = %+v", c)
	}
	dir := t.TempDir()
	for _, name := range []string{"b.svg", "b.png"} {
		file := filepath.Join(dir, name)
		if err := WritePlot(file, rep); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if name == "b.svg" && !bytes.Contains(b, []byte("<svg")) {
			t.Errorf("%s is not SVG", name)
		}
		if name == "b.png" && !bytes.HasPrefix(b, []byte("\x89PNG")) {
			t.Errorf("%s is not PNG", name)
		}
	}
	if err := WritePlot(filepath.Join(dir, "c.svg"), &Report{}); err == nil {
		t.Error("a chart of nothing was written")
	}
}

func TestLoadAverageAndBusyNote(t *testing.T) {
	fsys := fstest.MapFS{loadavgPath: {Data: []byte("7.16 3.54 1.59 3/200 12345\n")}}
	if got := loadAverage(fsys); got != 7.16 {
		t.Errorf("loadAverage = %v", got)
	}
	if got := loadAverage(fstest.MapFS{}); got != 0 {
		t.Errorf("loadAverage without /proc/loadavg = %v", got)
	}
	if n := busyNote(Host{CPUs: 2, LoadStart: 0.3, LoadEnd: 0.9}); n != "" {
		t.Errorf("an idle host is called busy: %q", n)
	}
	if n := busyNote(Host{CPUs: 2, LoadStart: 7.16, LoadEnd: 0.2}); !strings.Contains(n, "7.16 at the start") {
		t.Errorf("busy note %q", n)
	}
}
