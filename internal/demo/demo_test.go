package demo_test

import (
	"context"
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
				"snapshot save", "snapshot restore (eager)", "snapshot restore (lazy)"}, seen)
			require.Len(t, rep.Steps, len(seen))
			// The dirty step saw every page, then exactly 110.
			require.Contains(t, rep.Steps[6].Detail, "8192 after the guest wrote everything; then 110")
			require.True(t, strings.HasPrefix(rep.Steps[7].Detail, "4 MiB returned"))
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
	_, err = demo.Layout(3 << 20)
	require.Error(t, err)
}
