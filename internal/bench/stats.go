//go:build amd64

package bench

import (
	"slices"
	"time"
)

// Summary condenses the timings of one figure: the median of the measured
// runs with their spread (min and max), and the cold first run, reported
// apart because the first touch of memory a process has not used before
// costs more on most hosts.
type Summary struct {
	N      int           `json:"n"`         // measured runs (after warm-up)
	Median time.Duration `json:"median_ns"` // median of the measured runs
	Min    time.Duration `json:"min_ns"`
	Max    time.Duration `json:"max_ns"`
	Cold   time.Duration `json:"cold_ns"` // the very first run, warm-up or not
}

// median returns the median of d (the mean of the two middle values for an
// even count), or 0 for none. d is not modified.
func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return s[n/2-1] + (s[n/2]-s[n/2-1])/2
}

// summarize summarizes all, the timings of every run in order, of which the
// first warmup are warm-up runs. The first run is Cold whether it was a
// warm-up or not; the median and spread are over the runs after the
// warm-up. With no run past the warm-up (an interrupted bench) the
// warm-up runs are summarized instead, so nothing measured is lost.
func summarize(all []time.Duration, warmup int) Summary {
	if len(all) == 0 {
		return Summary{}
	}
	measured := all
	if warmup < len(all) {
		measured = all[max(warmup, 0):]
	}
	return Summary{
		N:      len(measured),
		Median: median(measured),
		Min:    slices.Min(measured),
		Max:    slices.Max(measured),
		Cold:   all[0],
	}
}

// Spread returns (max-min)/median, the relative spread, or 0.
func (s Summary) Spread() float64 {
	if s.Median <= 0 {
		return 0
	}
	return float64(s.Max-s.Min) / float64(s.Median)
}
