//go:build amd64

package demo_test

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/demo"
	"github.com/gmem-vmm/gmem/internal/testenv"
)

func TestRunEveryStep(t *testing.T) {
	testenv.KVM(t) // skips, or fails under GMEM_REQUIRE_KVM=1, without /dev/kvm
	for _, b := range []guestmem.Backing{guestmem.Memfd, guestmem.Anonymous} {
		t.Run(b.String(), func(t *testing.T) {
			fds, maps := testenv.OpenFDs(t), testenv.GuestMappings(t)
			c := demo.DefaultConfig()
			c.Size, c.Backing, c.TempDir, c.LockOnFault = 32<<20, b, t.TempDir(), true
			var seen []string
			rep, err := demo.Run(context.Background(), c, func(s demo.Step) { seen = append(seen, s.Name) })
			require.NoError(t, err)
			require.Equal(t, []string{"map guest RAM", "lock on fault", "prefault", "register with KVM",
				"guest writes every page", "guest verifies every page", "dirty pages", "balloon discard",
				"snapshot save", "snapshot restore (eager)", "snapshot restore (lazy)",
				"snapshot restore (userfaultfd)"}, seen)
			require.Len(t, rep.Steps, len(seen))
			// The dirty step saw every page, then exactly 110.
			require.Contains(t, rep.Steps[6].Detail, "8192 after the guest wrote everything; then 110")
			require.True(t, strings.HasPrefix(rep.Steps[7].Detail, "4 MiB returned"))
			require.Equal(t, fds, testenv.OpenFDs(t), "no fd left behind")
			require.Equal(t, maps, testenv.GuestMappings(t), "no guest mapping left behind")
		})
	}
}

// TestRunAtEverySizeClass runs the demo end to end at the smallest size,
// at sizes whose two regions are uneven (6 MiB: 4 + 2, 10 MiB: 6 + 4), and
// at the smallest size on hugetlb, where the balloon must be whole 2 MiB
// pages. Each step's counts are the plan's.
func TestRunAtEverySizeClass(t *testing.T) {
	testenv.KVM(t)
	for _, tc := range []struct {
		size     uint64
		backing  guestmem.Backing
		lock     bool
		prefault bool
	}{
		{demo.MinSize, guestmem.Memfd, false, true},
		{demo.MinSize, guestmem.Anonymous, true, false},
		{6 << 20, guestmem.Memfd, true, true},
		{10 << 20, guestmem.Anonymous, false, true},
		{demo.MinSize, guestmem.Hugetlb, false, true},
		{6 << 20, guestmem.Hugetlb, false, true},
	} {
		t.Run(fmt.Sprintf("%s/%dM", tc.backing, tc.size>>20), func(t *testing.T) {
			if tc.backing == guestmem.Hugetlb {
				testenv.NeedHugetlbPages(t, int(tc.size>>21))
			}
			plan, err := demo.NewPlan(tc.size, tc.backing)
			require.NoError(t, err)
			fds, maps := testenv.OpenFDs(t), testenv.GuestMappings(t)
			c := demo.DefaultConfig()
			c.Size, c.Backing, c.TempDir, c.LockOnFault, c.Prefault = tc.size, tc.backing, t.TempDir(), tc.lock,
				tc.prefault
			steps := map[string]string{}
			rep, err := demo.Run(context.Background(), c, func(s demo.Step) { steps[s.Name] = s.Detail })
			require.NoError(t, err)
			require.Len(t, rep.Steps, len(steps))
			require.Equal(t, plan.Layout, rep.Layout)
			require.Contains(t, steps["guest writes every page"], fmt.Sprintf("%d pages", plan.Pages))
			require.Contains(t, steps["guest verifies every page"], "guest and host checksums agree")
			require.Equal(t, fmt.Sprintf("%d after the guest wrote everything; then %d (%d by the guest, %d by the host)",
				plan.Pages, plan.DirtyAfter(), plan.GuestDirtyPages(), len(plan.HostDirty)), steps["dirty pages"])
			require.Contains(t, steps["balloon discard"], "the guest reads zeros there")
			require.Equal(t, "checksums match", steps["snapshot restore (eager)"])
			require.Equal(t, "checksums match", steps["snapshot restore (lazy)"])
			require.Contains(t, steps["snapshot restore (userfaultfd)"], "the guest's checksum of")
			require.Contains(t, steps["snapshot restore (userfaultfd)"], "resident after")
			require.Equal(t, fds, testenv.OpenFDs(t), "no fd left behind")
			require.Equal(t, maps, testenv.GuestMappings(t), "no guest mapping left behind")
		})
	}
}

func TestRunCancelledReleasesEverything(t *testing.T) {
	testenv.KVM(t)
	fds, maps := testenv.OpenFDs(t), testenv.GuestMappings(t)
	ctx, cancel := context.WithCancel(context.Background())
	c := demo.DefaultConfig()
	c.Size, c.TempDir = 32<<20, t.TempDir()
	rep, err := demo.Run(ctx, c, func(s demo.Step) {
		if s.Name == "guest writes every page" {
			cancel()
		}
	})
	require.ErrorIs(t, err, context.Canceled)
	require.Len(t, rep.Steps, 4, "the steps before the interruption are reported")
	require.Equal(t, fds, testenv.OpenFDs(t))
	require.Equal(t, maps, testenv.GuestMappings(t))
}

func TestLayoutHasAHole(t *testing.T) {
	l, err := demo.Layout(512 << 20)
	require.NoError(t, err)
	require.Equal(t, guestmem.Layout{{GPA: 0, Size: 256 << 20}, {GPA: 320 << 20, Size: 256 << 20}}, l)
	l, err = demo.Layout(6 << 20)
	require.NoError(t, err)
	require.Equal(t, guestmem.Layout{{GPA: 0, Size: 4 << 20}, {GPA: 68 << 20, Size: 2 << 20}}, l, "uneven regions")
	_, err = demo.Layout(3 << 20)
	require.Error(t, err)
}
