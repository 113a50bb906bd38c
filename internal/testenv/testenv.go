// Package testenv holds the test helpers that more than one package needs:
// what the host offers (a hugetlb pool) and what /proc says about a mapping.
package testenv

import (
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/gmem-vmm/gmem/internal/procfs"
	"github.com/gmem-vmm/gmem/kvm"
)

// NeedHugetlbPages skips t (fails it under GMEM_REQUIRE_KVM=1, see Skip)
// unless the 2 MiB hugetlb pool has n free pages, saying how to make one. .ci/run sets up such a pool.
func NeedHugetlbPages(t testing.TB, n int) {
	t.Helper()
	b, err := os.ReadFile("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
	if err != nil {
		Skip(t, "no 2 MiB hugetlb pool on this host: %v", err)
	}
	free, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if free < n {
		Skip(t, "hugetlb pool has %d free 2 MiB pages, test needs %d (echo 64 > /proc/sys/vm/nr_hugepages)", free, n)
	}
}

// VMA is one kernel memory area of this process, from /proc/self/smaps.
type VMA = procfs.VMA

// VMAAt returns the VMA containing addr; ok is false if addr is unmapped.
func VMAAt(t testing.TB, addr uintptr) (v VMA, ok bool) {
	t.Helper()
	vmas, err := procfs.SmapsRange(addr, addr+1)
	if err != nil {
		t.Fatal(err)
	}
	if len(vmas) == 0 {
		return VMA{}, false
	}
	return vmas[0], true
}

// GuestMappings counts this process's memory areas marked MADV_DONTDUMP
// ("dd" in smaps) and not MADV_WIPEONFORK ("wf"): guest memory and arenas
// are the former; the Go runtime's only such areas (vgetrandom state) are
// also the latter. The count shows whether a failed setup left guest memory
// behind.
func GuestMappings(t testing.TB) int {
	t.Helper()
	vmas, err := procfs.Smaps()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for i := range vmas {
		if vmas[i].HasFlag("dd") && !vmas[i].HasFlag("wf") {
			n++
		}
	}
	return n
}

// OpenFDs counts this process's open file descriptors.
func OpenFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// KVM opens /dev/kvm for a test. When it cannot, the test is skipped with
// the reason, or fails when GMEM_REQUIRE_KVM=1 (set by .ci/run on hosts with
// /dev/kvm, where every KVM test must run). The device is closed at cleanup.
func KVM(t testing.TB) *kvm.Device {
	t.Helper()
	d, err := kvm.Open("")
	if err != nil {
		Skip(t, "KVM unavailable: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// VM creates a VM for a test, closed at cleanup.
func VM(t testing.TB) *kvm.VM {
	t.Helper()
	vm, err := KVM(t).CreateVM()
	if err != nil {
		t.Fatalf("creating VM: %v", err)
	}
	t.Cleanup(func() { vm.Close() })
	return vm
}

// RequireKVM reports whether GMEM_REQUIRE_KVM=1 is set.
func RequireKVM() bool { return os.Getenv("GMEM_REQUIRE_KVM") == "1" }

// Skip skips t with the formatted reason, or fails it under
// GMEM_REQUIRE_KVM=1: on a KVM host no KVM test may skip.
func Skip(t testing.TB, format string, args ...any) {
	t.Helper()
	if RequireKVM() {
		t.Fatalf("GMEM_REQUIRE_KVM=1 but: "+format, args...)
	}
	t.Skipf(format, args...)
}
