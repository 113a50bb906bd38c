//go:build amd64

package bench

import (
	"math"
	"slices"
	"testing"
	"time"

	"github.com/gmem-vmm/gmem/internal/units"
)

func TestMedian(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		var d []time.Duration
		for _, x := range v {
			d = append(d, time.Duration(x)*time.Millisecond)
		}
		return d
	}
	for _, tc := range []struct {
		in   []time.Duration
		want time.Duration
	}{
		{nil, 0},
		{ms(7), 7 * time.Millisecond},
		{ms(9, 1, 5), 5 * time.Millisecond},
		{ms(4, 1, 3, 2), 2500 * time.Microsecond}, // mean of the two middle values
		{ms(1, 1, 100, 1, 1), time.Millisecond},   // an outlier does not move it
		{[]time.Duration{1, 2}, 1},                // integer midpoint rounds down
	} {
		in := slices.Clone(tc.in)
		if got := median(in); got != tc.want {
			t.Errorf("median(%v) = %v, want %v", tc.in, got, tc.want)
		}
		if !slices.Equal(in, tc.in) {
			t.Errorf("median reordered its input: %v", in)
		}
	}
}

func TestSummarizeSeparatesColdAndWarmup(t *testing.T) {
	// run 1 is a cold warm-up, far slower; runs 2..6 are measured.
	all := []time.Duration{900, 10, 14, 12, 11, 30}
	s := summarize(all, 1)
	want := Summary{N: 5, Median: 12, Min: 10, Max: 30, Cold: 900}
	if s != want {
		t.Fatalf("summarize = %+v, want %+v", s, want)
	}
	if got := s.Spread(); math.Abs(got-20.0/12) > 1e-9 {
		t.Errorf("Spread = %v, want %v", got, 20.0/12)
	}
}

func TestSummarizeWithoutWarmupCountsTheColdRun(t *testing.T) {
	s := summarize([]time.Duration{50, 10, 20}, 0)
	if s.Cold != 50 || s.N != 3 || s.Median != 20 || s.Max != 50 {
		t.Fatalf("summarize = %+v", s)
	}
}

func TestSummarizeInterruptedInWarmupKeepsWhatWasMeasured(t *testing.T) {
	s := summarize([]time.Duration{40, 30}, 3)
	if s.N != 2 || s.Median != 35 || s.Cold != 40 || s.Min != 30 {
		t.Fatalf("summarize = %+v", s)
	}
	if (summarize(nil, 1) != Summary{}) {
		t.Fatal("summarize(nil) is not zero")
	}
}

func TestSpreadOfNothing(t *testing.T) {
	if (Summary{}).Spread() != 0 {
		t.Error("Spread of an empty summary is not 0")
	}
}

func TestSummarizeJob(t *testing.T) {
	j := job{size: 64 * units.MiB, backing: "anon", method: "prefault x1", workers: 1}
	samples := []sample{
		{mapT: 5, register: 1, prefault: 1000, teardown: 7},
		{mapT: 3, register: 2, prefault: 100, teardown: 4},
		{mapT: 4, register: 3, prefault: 300, teardown: 6, huge: 0.5, resident: 1, note: "n"},
	}
	r := summarizeJob(j, samples, 1)
	if r.Map.Median != 3 || r.Map.Cold != 5 || r.Prefault.Median != 200 || r.Setup.Median != 206 ||
		r.Setup.Cold != 1006 || r.Teardown.N != 2 {
		t.Fatalf("summarizeJob = map %+v prefault %+v setup %+v teardown %+v", r.Map, r.Prefault, r.Setup, r.Teardown)
	}
	if want := units.GiBPerSec(uint64(64*units.MiB), 200); r.GiBps != want {
		t.Errorf("GiBps = %v, want %v", r.GiBps, want)
	}
	if r.Huge != 0.5 || r.Resident != 1 || r.Note != "n" || r.SizeText != "64MiB" {
		t.Errorf("result = %+v", r)
	}

	// A phase a method lacks (negative) is nil, and is not in the setup.
	peer := summarizeJob(job{size: units.GiB, peer: true}, []sample{
		{mapT: notApplicable, register: notApplicable, prefault: 10, teardown: notApplicable},
	}, 0)
	if peer.Map != nil || peer.Register != nil || peer.Teardown != nil || peer.Setup.Median != 10 {
		t.Fatalf("peer result = %+v", peer)
	}
}
