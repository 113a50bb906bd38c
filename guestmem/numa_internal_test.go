package guestmem

import (
	"context"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/internal/testenv"
)

// cpusAllowed returns the Cpus_allowed_list of a thread's status file.
func cpusAllowed(t *testing.T, status string) string {
	t.Helper()
	b, err := os.ReadFile(status)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Cpus_allowed_list:"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("%s has no Cpus_allowed_list", status)
	return ""
}

// Prefault runs each worker populating memory bound to a node on that
// node's CPUs, as the kernel sees the worker's thread, and gives every
// thread its affinity back afterwards. The fake host's node 0 has only the
// last CPU this process may use, so the pinning is visible on a one-node
// host.
func TestPrefaultPinsWorkersToTheNodesCPUs(t *testing.T) {
	var all unix.CPUSet
	if err := unix.SchedGetaffinity(0, &all); err != nil {
		t.Fatal(err)
	}
	if all.Count() < 2 {
		t.Skipf("this process may run on %d CPU; pinning to a node's CPUs needs two to be seen", all.Count())
	}
	last := -1
	for c := range len(all) * 64 {
		if all.IsSet(c) {
			last = c
		}
	}
	fake := testenv.DefaultFakeHost()
	root := fake.FS()
	root["sys/devices/system/node/node0/cpulist"].Data = []byte(strconv.Itoa(last) + "\n")
	before := cpusAllowed(t, "/proc/thread-self/status")

	var mu sync.Mutex
	var seen []string
	pinnedHook = func() {
		s := cpusAllowed(t, "/proc/thread-self/status")
		mu.Lock()
		seen = append(seen, s)
		mu.Unlock()
	}
	t.Cleanup(func() { pinnedHook = nil })

	m, err := New(Layout{{GPA: 0, Size: 32 << 20}, {GPA: 64 << 20, Size: 16 << 20}},
		withNodeRoot(root), WithNUMA(NUMABind(0), Span{GPA: 0, Size: 32 << 20}))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Prefault(context.Background(), PrefaultOptions{Workers: 2, ChunkSize: 4 << 20}); err != nil {
		t.Fatal(err)
	}
	pinnedHook = nil
	// The bound region's 32 MiB is 8 or 9 chunks (chunks end on 4 MiB arena
	// offsets; the region starts after a 2 MiB guard); the other region's
	// would add 4 or 5.
	if len(seen) < 8 || len(seen) > 9 {
		t.Fatalf("%d chunks populated pinned, want the bound region's 8 or 9 only", len(seen))
	}
	for _, s := range seen {
		if s != strconv.Itoa(last) {
			t.Fatalf("a worker populating node 0's memory ran on CPUs %q, want %d", s, last)
		}
	}
	ents, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if got := cpusAllowed(t, "/proc/self/task/"+e.Name()+"/status"); got != before {
			t.Fatalf("thread %s kept CPUs %q after Prefault, want %q", e.Name(), got, before)
		}
	}
}
