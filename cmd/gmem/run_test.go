//go:build amd64

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/gmem-vmm/gmem/internal/testenv"
)

func TestRunDemo(t *testing.T) {
	testenv.KVM(t)
	fds, maps := testenv.OpenFDs(t), testenv.GuestMappings(t)
	code, out, errs := runGmem(t, context.Background(), "run", "--size", "64M", "--lock-on-fault")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	for _, want := range []string{"64MiB guest, memfd backing", "guest writes every page", "16384 pages",
		"all correct; guest and host checksums agree", "then 110 (100 by the guest, 10 by the host)",
		"8 MiB returned", "snapshot restore (lazy)", "snapshot restore (userfaultfd)", "guest memory released"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if fds != testenv.OpenFDs(t) || maps != testenv.GuestMappings(t) {
		t.Errorf("gmem run left fds or guest mappings behind")
	}

	code, out, errs = runGmem(t, context.Background(), "run", "--size", "16M", "--backing", "anon", "--json",
		"--no-prefault", "--no-hugepages")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errs)
	}
	var rep struct {
		Steps []struct {
			Name     string `json:"name"`
			Duration int64  `json:"duration_ns"`
		} `json:"steps"`
		Total int64 `json:"total_ns"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(rep.Steps) != 10 || rep.Steps[1].Name != "register with KVM" ||
		rep.Steps[9].Name != "snapshot restore (userfaultfd)" || rep.Total <= 0 {
		t.Fatalf("JSON report: %+v", rep)
	}
}

// The smallest size the help allows, and sizes whose regions are uneven,
// run every step through the command.
func TestRunSmallestAndUnevenSizes(t *testing.T) {
	testenv.KVM(t)
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"--size", "4M"}, []string{"4MiB guest", "1024 pages", "then 110 (100 by the guest, 10 by the host)",
			"0.5 MiB returned"}},
		{[]string{"--size", "6M", "--backing", "anon"}, []string{"6MiB guest", "1536 pages",
			"then 110 (100 by the guest, 10 by the host)", "1 MiB returned"}},
		{[]string{"--size", "10M", "--no-prefault"}, []string{"10MiB guest", "2560 pages",
			"then 110 (100 by the guest, 10 by the host)", "1.5 MiB returned"}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			code, out, errs := runGmem(t, context.Background(), append([]string{"run"}, tc.args...)...)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, errs)
			}
			for _, want := range append(tc.want, "all correct; guest and host checksums agree", "snapshot restore (lazy)",
				"guest memory released") {
				if !strings.Contains(out, want) {
					t.Errorf("output lacks %q:\n%s", want, out)
				}
			}
		})
	}
}

func TestRunInterrupted(t *testing.T) {
	testenv.KVM(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	code, _, errs := runGmem(t, ctx, "run", "--size", "16M")
	if code != exitInterrupted || !strings.Contains(errs, "guest memory released") || strings.Count(errs, "\n") != 1 {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
}

// Bad input: one line on stderr, a non-zero exit, nothing allocated.
func TestRunRefusals(t *testing.T) {
	small := defaultFakeHost()
	small.MemAvailKB = 256 << 10 // 256 MiB available
	for _, tc := range []struct {
		name string
		args []string
		host fakeHost
		code int
		want string
	}{
		{"no KVM", []string{"run", "--kvm", "/nonexistent/kvm"}, defaultFakeHost(), exitError,
			"gmem run needs KVM: kvm: device not available: /nonexistent/kvm does not exist"},
		{"malformed size", []string{"run", "--size", "12Q"}, defaultFakeHost(), exitUsage, "--size"},
		{"unaligned size", []string{"run", "--size", "5M"}, defaultFakeHost(), exitUsage, "multiple of 2 MiB"},
		{"negative workers", []string{"run", "--workers=-1"}, defaultFakeHost(), exitUsage, "--workers -1"},
		{"too large", []string{"run", "--size", "1G"}, small, exitError, "MemAvailable is 256.0 MiB (268435456 bytes) of 24.0 GiB total (/proc/meminfo); choose a smaller --size"},
		{"no hugetlb pool", []string{"run", "--backing", "hugetlb"}, defaultFakeHost(), exitError,
			"backing hugetlb is unavailable"},
		{"unknown backing", []string{"run", "--backing", "floppy"}, defaultFakeHost(), exitUsage, "--backing"},
		{"unknown flag", []string{"run", "--turbo"}, defaultFakeHost(), exitUsage, "unknown flag --turbo"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run(context.Background(), tc.args, &out, &errb, tc.host.FS())
			if code != tc.code || !strings.Contains(errb.String(), tc.want) || strings.Count(errb.String(), "\n") != 1 ||
				out.Len() != 0 {
				t.Fatalf("exit %d (want %d), stdout %q, stderr %q (want %q)", code, tc.code, out.String(), errb.String(),
					tc.want)
			}
		})
	}
}
