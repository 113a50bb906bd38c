//go:build amd64

package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/host"
)

// mainEnv makes the test binary run gmem's main instead of the tests, so
// that a test can check the exit status the process really ends with.
const mainEnv = "GMEM_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(mainEnv) == "1" {
		main() // exits
	}
	os.Exit(m.Run())
}

// gmemProcess runs `gmem args...` as a process, through main, and returns
// its exit status and output.
func gmemProcess(t *testing.T, exe string, cred *syscall.Credential, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), mainEnv+"=1")
	cmd.Dir = filepath.Dir(exe)
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		code = exit.ExitCode()
	default:
		t.Fatalf("running gmem %v: %v", args, err)
	}
	return code, out.String(), errb.String()
}

// TestBadCommandLinesExit2 runs gmem as a process on bad command lines of
// every command: each exits 2, before looking at the host, with one line
// on stderr that names the flag and says what is wrong.
func TestBadCommandLinesExit2(t *testing.T) {
	exe, err := os.Executable()
	require.NoError(t, err)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{}, `expected one of "run", "probe", "bench"`},
		{[]string{"frobnicate"}, "unexpected argument frobnicate"},

		{[]string{"run", "--turbo"}, "unknown flag --turbo"},
		{[]string{"run", "--backing", "floppy"}, `--backing must be one of "anon","memfd","hugetlb" but got "floppy"`},
		{[]string{"run", "--size", "12Q"}, `--size: malformed size: "12Q": unknown unit "Q"`},
		{[]string{"run", "--size", "4GB"}, "write G or GiB"},
		{[]string{"run", "--size", "5M"}, "--size 5MiB: must be a multiple of 2 MiB from 4MiB to 65472MiB"},
		{[]string{"run", "--size", "2M"}, "--size 2MiB: must be a multiple of 2 MiB from 4MiB to 65472MiB"},
		{[]string{"run", "--size", "0"}, "--size 0B: must be a multiple of 2 MiB from 4MiB to 65472MiB"},
		{[]string{"run", "--size", "64G"}, "--size 64GiB: must be a multiple of 2 MiB from 4MiB to 65472MiB"},
		{[]string{"run", "--workers=-1"}, "--workers -1: must not be negative (0 is one per CPU)"},
		{[]string{"run", "--workers", "many"}, `--workers: expected a valid 64 bit int but got "many"`},

		{[]string{"probe", "--bogus"}, "unknown flag --bogus"},
		{[]string{"probe", "--measure-size", "3M"}, "--measure-size 3MiB: must be a positive multiple of 2 MiB"},
		{[]string{"probe", "--measure-size", "0"}, "--measure-size 0B: must be a positive multiple of 2 MiB"},
		{[]string{"probe", "--measure-size", "lots"}, "--measure-size: malformed size"},

		{[]string{"bench", "--bogus"}, "unknown flag --bogus"},
		{[]string{"bench", "--backings", "foo"}, `--backings: unknown name "foo" (want some of anon, anon-thp, memfd, hugetlb, gmem)`},
		{[]string{"bench", "--strategies", "foo"}, `--strategies: unknown name "foo" (want some of none, map-populate`},
		{[]string{"bench", "--peers", "foo"}, `--peers: unknown name "foo" (want some of madvise, memset, qemu, gokvm)`},
		{[]string{"bench", "--peers", "none,qemu"}, `--peers: unknown name "none"`},
		{[]string{"bench", "--guest-touch", "maybe"}, `--guest-touch must be one of "auto","on","off" but got "maybe"`},
		{[]string{"bench", "--workers=-1"}, "--workers -1: must not be negative (0 is one per CPU)"},
		{[]string{"bench", "--runs", "0"}, "--runs 0: at least 1 run is needed"},
		{[]string{"bench", "--runs=-3"}, "--runs -3: at least 1 run is needed"},
		{[]string{"bench", "--warmup=-1"}, "--warmup -1: must not be negative"},
		{[]string{"bench", "--runs", "five"}, `--runs: expected a valid 64 bit int but got "five"`},
		{[]string{"bench", "--sizes", "3M"}, "--sizes: 3MiB is not a positive multiple of 2 MiB"},
		{[]string{"bench", "--sizes", "0"}, "--sizes: 0B is not a positive multiple of 2 MiB"},
		{[]string{"bench", "--sizes", "4X"}, `--sizes: malformed size: "4X": unknown unit "X"`},
		{[]string{"bench", "--hugepage-size", "3M"}, "--hugepage-size 3MiB: must be a power of two of at least 2 MiB"},
		{[]string{"bench", "--plot", "x.pdf"}, "--plot x.pdf: the chart is written as .svg or .png"},
		{[]string{"bench", "--json", "--csv"}, "--json and --csv can't be used together"},
		{[]string{"bench", "--guest-touch", "on", "--sizes", "128G"}, "--guest-touch on: the guest identity-maps"},
		{[]string{"bench", "--peers", "madvise", "--qemu", "/usr/bin/qemu"}, "--qemu given but the qemu peer is not in --peers madvise"},
		{[]string{"bench", "--peers", "gokvm", "--sizes", "16M"}, "--peers gokvm: machine.New needs at least 32MiB of guest RAM, not 16MiB"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			code, stdout, stderr := gmemProcess(t, exe, nil, tc.args...)
			require.Equal(t, exitUsage, code, "stderr %q", stderr)
			require.Empty(t, stdout)
			require.True(t, strings.HasPrefix(stderr, "gmem: error: "), "stderr %q", stderr)
			require.Equal(t, 1, strings.Count(stderr, "\n"), "stderr %q is not one line", stderr)
			require.Contains(t, stderr, tc.want)
			help := "(see gmem --help)"
			if len(tc.args) > 0 && strings.Contains("run probe bench", tc.args[0]) {
				help = "(see gmem " + tc.args[0] + " --help)"
			}
			require.True(t, strings.HasSuffix(stderr, help+"\n"), "stderr %q does not end with %s", stderr, help)
		})
	}
}

// TestKVMPermissionAdviceFromTheNode opens copies of /dev/kvm (mknod c 10
// 232) that nobody may not open, through gmem run and gmem probe run as
// nobody: the advice follows the node's mode and group. No KVM is needed:
// the permission check comes before the driver.
func TestKVMPermissionAdviceFromTheNode(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mknod and running as nobody need root")
	}
	dir := t.TempDir()
	for _, p := range []string{dir, filepath.Dir(dir)} {
		require.NoError(t, os.Chmod(p, 0o755))
	}
	exe, err := os.Executable()
	require.NoError(t, err)
	b, err := os.ReadFile(exe)
	require.NoError(t, err)
	child := filepath.Join(dir, "gmem.test")
	require.NoError(t, os.WriteFile(child, b, 0o755))
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}

	for _, tc := range []struct {
		name string
		perm uint32
		gid  int // a group nobody is not in; 100 is "users" on most systems
		want []string
		not  []string
	}{
		{"root:root 0600", 0o600, 0, []string{"mode 0600, owner root (uid 0), group root (gid 0)",
			"its group root may not read and write it (mode 0600)", "groupadd -f -r kvm",
			`KERNEL=="kvm", GROUP="kvm", MODE="0660"`, "udevadm trigger", "usermod -aG kvm $USER"},
			[]string{"usermod -aG root"}},
		{"root:100 0660", 0o660, 100, []string{"mode 0660", "may read and write it: add the user to that group"},
			[]string{"udev", "groupadd"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			node := filepath.Join(dir, "kvm-"+strings.ReplaceAll(tc.name, " ", "-"))
			if err := unix.Mknod(node, unix.S_IFCHR, int(unix.Mkdev(10, 232))); err != nil {
				t.Skipf("cannot make a device node here: %v", err)
			}
			require.NoError(t, os.Chown(node, 0, tc.gid))
			require.NoError(t, os.Chmod(node, os.FileMode(tc.perm)))

			code, stdout, stderr := gmemProcess(t, child, nobody, "run", "--size", "4M", "--kvm", node)
			require.Equal(t, exitError, code, "stdout %q, stderr %q", stdout, stderr)
			require.Equal(t, 1, strings.Count(stderr, "\n"), "stderr %q", stderr)
			require.Contains(t, stderr, "gmem: error: gmem run needs KVM: kvm: permission denied: "+node)
			for _, w := range tc.want {
				require.Contains(t, stderr, w)
			}
			for _, n := range tc.not {
				require.NotContains(t, stderr, n)
			}

			code, stdout, stderr = gmemProcess(t, child, nobody, "probe", "--json", "--no-measure", "--kvm", node)
			require.Equal(t, exitOK, code, "stderr %q", stderr)
			var p host.Facts
			require.NoError(t, json.Unmarshal([]byte(stdout), &p))
			require.True(t, p.KVM.Present)
			require.False(t, p.KVM.Usable)
			a := adviceWith(&p, "is present but not usable")
			for _, w := range tc.want {
				require.Contains(t, a, w)
			}
			for _, n := range tc.not {
				require.NotContains(t, a, n)
			}
		})
	}
}
