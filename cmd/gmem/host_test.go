//go:build amd64

package main

import (
	"strings"
	"testing"

	"github.com/gmem-vmm/gmem/internal/testenv"
)

func TestCheckFitsGivesTheNumbers(t *testing.T) {
	h := testenv.DefaultFakeHost()
	h.MemAvailKB = 3 << 20 // 3 GiB
	fsys := h.FS()
	if err := checkFits(fsys, 2*GiB, "--sizes"); err != nil {
		t.Fatalf("2 GiB in 3 GiB available: %v", err)
	}
	err := checkFits(fsys, 4*GiB, "--sizes")
	if err == nil {
		t.Fatal("4 GiB accepted with 3 GiB available")
	}
	for _, want := range []string{"4GiB", "4294967296", "MemAvailable is 3.0 GiB", "3221225472", "24.0 GiB total",
		"choose a smaller --sizes"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

// fakeHost is a host's /proc and /sys, for the commands' checks.
type fakeHost = testenv.FakeHost

func defaultFakeHost() fakeHost { return testenv.DefaultFakeHost() }
