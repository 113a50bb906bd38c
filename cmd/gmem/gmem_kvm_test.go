//go:build amd64

package main

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"

	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
)

// needGuestMemfd skips (fails under GMEM_REQUIRE_KVM=1) unless KVM's
// guest_memfd can be mapped by the host.
func needGuestMemfd(t *testing.T) {
	t.Helper()
	c, err := testenv.KVM(t).Capabilities()
	const want = kvm.GuestMemfdMmap | kvm.GuestMemfdInitShared
	if err != nil || c.GuestMemfdFlags&want != want {
		testenv.Skip(t, "guest_memfd cannot be mapped by the host here (flags %v, %v)", c.GuestMemfdFlags, err)
	}
}

// gmem probe names the guest_memfd flags and says what they allow.
func TestProbeGuestMemfd(t *testing.T) {
	needGuestMemfd(t)
	code, out, errOut := runGmem(t, context.Background(), "probe", "--no-measure")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, want := range []string{
		"guest_memfd flags       mmap|init-shared (the host can map it: guestmem.WithGuestMemfd, --backings gmem)",
		"guest_memfd can be mapped by the host (flags mmap|init-shared)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("probe lacks %q:\n%s", want, out)
		}
	}
}

// gmem bench measures the guest_memfd backing: every strategy but
// map-populate (a peer's method), registration included, prefaults that
// make it all resident.
func TestBenchGuestMemfd(t *testing.T) {
	needGuestMemfd(t)
	code, out, errOut := runGmem(t, context.Background(), "bench", "--sizes", "64M", "--runs", "1", "--warmup", "0",
		"--backings", "gmem", "--peers", "none", "--guest-touch", "on", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	r := decodeReport(t, out)
	n := runtime.NumCPU()
	methods := []string{"none", "prefault x1", fmt.Sprintf("prefault x%d", n), "touch"}
	if len(r.Results) != len(methods) {
		t.Fatalf("%d results, want %d (%v): %s", len(r.Results), len(methods), methods, out)
	}
	for _, m := range methods {
		res := find(r, "gmem", m)
		if res == nil {
			t.Fatalf("no gmem %s: %s", m, out)
		}
		if res.Register == nil || res.Register.Median <= 0 {
			t.Errorf("gmem %s: registration not measured: %+v", m, res)
		}
		if m != "none" && res.Resident < 0.99 {
			t.Errorf("gmem %s left %.0f%% resident", m, 100*res.Resident)
		}
	}
	if res := find(r, "gmem", "none"); res == nil || res.GuestTouch == nil {
		t.Errorf("gmem none: the guest's first touch not measured: %+v", res)
	}
}
