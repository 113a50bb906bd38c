package guestmem

import (
	"testing"
	"time"
)

// worthAnotherRound: within target, another round comes first while the
// guest dirties less than half the throughput and the estimate is above an
// eighth of the target; never for an idle guest or a tiny estimate.
func TestWorthAnotherRound(t *testing.T) {
	const target = 100 * time.Millisecond
	const mbps = 1e6
	for _, c := range []struct {
		name       string
		downtime   time.Duration
		dirty, thr float64
		want       bool
	}{
		{"slow dirtying, estimate near the target", 80 * time.Millisecond, 4 * mbps, 120 * mbps, true},
		{"a third of the throughput", 60 * time.Millisecond, 40 * mbps, 120 * mbps, true},
		{"half the throughput: a round would not halve it", 60 * time.Millisecond, 60 * mbps, 120 * mbps, false},
		{"faster than the link", 90 * time.Millisecond, 200 * mbps, 120 * mbps, false},
		{"an eighth of the target", target / 8, 4 * mbps, 120 * mbps, false},
		{"just above an eighth", target/8 + time.Millisecond, 4 * mbps, 120 * mbps, true},
		{"idle", 0, 0, 120 * mbps, false},
		{"no throughput measured", 50 * time.Millisecond, 1 * mbps, 0, false},
	} {
		rs := RoundStats{Downtime: c.downtime, DirtyRate: c.dirty, Throughput: c.thr}
		if got := worthAnotherRound(rs, target); got != c.want {
			t.Errorf("%s: worthAnotherRound = %v, want %v", c.name, got, c.want)
		}
	}
}
