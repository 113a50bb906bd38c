package kvm_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/kvm"
)

// node is /dev/kvm as stat shows it, with the given mode, owner and group.
func node(perm fs.FileMode, uid uint32, owner string, gid uint32, group string) kvm.Node {
	return kvm.Node{Path: "/dev/kvm", Exists: true, Mode: fs.ModeDevice | fs.ModeCharDevice | perm,
		Rdev: unix.Mkdev(10, 232), UID: uid, Owner: owner, GID: gid, Group: group}
}

var user1000 = kvm.Caller{UID: 1000, Groups: []int{1000}}

// The usermod advice only where joining the group helps; the kvm group,
// mode 0660 and a udev rule where it does not.
func TestAccessAdvice(t *testing.T) {
	udev := []string{"groupadd -f -r kvm", "chgrp kvm /dev/kvm", "chmod 0660 /dev/kvm",
		`KERNEL=="kvm", GROUP="kvm", MODE="0660"`, "/etc/udev/rules.d/65-kvm.rules", "udevadm control --reload-rules",
		"udevadm trigger", "usermod -aG kvm $USER", "log in again"}
	for _, tc := range []struct {
		name   string
		node   kvm.Node
		caller kvm.Caller
		want   []string
		not    []string
	}{
		{"root:kvm 0660: join kvm", node(0o660, 0, "root", 36, "kvm"), user1000,
			[]string{"its group kvm may read and write it", "usermod -aG kvm $USER", "log in again", "newgrp kvm"},
			[]string{"udev", "groupadd", "chmod"}},
		{"root:root 0600: kvm group, 0660, udev rule", node(0o600, 0, "root", 0, "root"), user1000,
			append([]string{"its group root may not read and write it (mode 0600)", "joining that group does not help"},
				udev...),
			[]string{"usermod -aG root"}},
		{"root:kvm 0600: the group lacks rw", node(0o600, 0, "root", 36, "kvm"), user1000,
			append([]string{"its group kvm may not read and write it (mode 0600)"}, udev...), nil},
		{"root:kvm 0640: the group may only read", node(0o640, 0, "root", 36, "kvm"), user1000,
			append([]string{"its group kvm may not read and write it (mode 0640)"}, udev...), nil},
		{"root:root 0660: not root's group", node(0o660, 0, "root", 0, "root"), user1000,
			append([]string{"its group is root (mode 0660)"}, udev...), []string{"usermod -aG root"}},
		{"another group with rw: join that one", node(0o660, 0, "root", 992, "render"), user1000,
			[]string{"usermod -aG render $USER"}, []string{"usermod -aG kvm", "udev"}},
		{"a group without a name", node(0o660, 0, "root", 4242, ""), user1000,
			[]string{"its group 4242 may read and write it", "usermod -aG 4242"}, nil},
		{"already in the group", node(0o660, 0, "root", 36, "kvm"), kvm.Caller{UID: 1000, Groups: []int{1000, 36}},
			[]string{"this process is in group kvm", "the denial comes from elsewhere", "--device /dev/kvm"},
			[]string{"usermod", "udev"}},
		{"everyone may", node(0o666, 0, "root", 36, "kvm"), user1000,
			[]string{"mode 0666 lets everyone read and write it", "the denial comes from elsewhere"},
			[]string{"usermod", "udev"}},
		{"root is refused", node(0o600, 0, "root", 0, "root"), kvm.Caller{UID: 0, Groups: []int{0}},
			[]string{"runs as root", "device cgroup"}, []string{"usermod", "udev"}},
		{"absent", kvm.Node{Path: "/dev/kvm"}, user1000,
			[]string{"/dev/kvm does not exist", "KVM module is not loaded", "modprobe kvm_intel", "modprobe kvm_amd",
				"VT-x or AMD-V", "nested virtualization"},
			[]string{"usermod", "udev"}},
		{"not a device", kvm.Node{Path: "/tmp/kvm", Exists: true, Mode: 0o600}, user1000,
			[]string{"/tmp/kvm is not a character device", "/dev/kvm, character device 10:232"}, []string{"usermod"}},
		{"cannot be examined", kvm.Node{Path: "/x/kvm", Exists: true, Err: unix.EACCES}, user1000,
			[]string{"/x/kvm cannot be examined (permission denied)"}, []string{"usermod"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := kvm.AccessAdvice(tc.node, tc.caller)
			require.NotContains(t, a, "\n")
			for _, w := range tc.want {
				require.Contains(t, a, w)
			}
			for _, n := range tc.not {
				require.NotContains(t, a, n)
			}
		})
	}
}

func TestNodeString(t *testing.T) {
	require.Equal(t, "character device 10:232, mode 0600, owner root (uid 0), group root (gid 0)",
		node(0o600, 0, "root", 0, "root").String())
	require.Equal(t, "character device 10:232, mode 0660, owner uid 7, group gid 36", node(0o660, 7, "", 36, "").String())
	require.Equal(t, "absent", kvm.Node{Path: "/dev/kvm"}.String())
}

// StatKVMNode reads a real node: its type, mode, owner and group.
func TestStatNode(t *testing.T) {
	p := filepath.Join(t.TempDir(), "kvm")
	require.NoError(t, os.WriteFile(p, nil, 0o600))
	require.NoError(t, os.Chmod(p, 0o640))
	n := kvm.StatNode(p)
	require.True(t, n.Exists)
	require.NoError(t, n.Err)
	require.Equal(t, fs.FileMode(0o640), n.Mode)
	require.Equal(t, uint32(os.Getuid()), n.UID)
	require.Equal(t, uint32(os.Getgid()), n.GID)
	require.Contains(t, kvm.AccessAdvice(n, kvm.ThisProcess()), "is not a character device")

	require.False(t, kvm.StatNode(filepath.Join(t.TempDir(), "absent")).Exists)

	if os.Getuid() == 0 {
		dev := filepath.Join(t.TempDir(), "kvm-copy")
		if err := unix.Mknod(dev, unix.S_IFCHR|0o600, int(unix.Mkdev(10, 232))); err == nil {
			n := kvm.StatNode(dev)
			require.Equal(t, "character device 10:232, mode 0600, owner root (uid 0), group root (gid 0)", n.String())
		}
	}
}

// Open's errors carry the advice: a missing node says to load the module.
func TestOpenAbsentAdvises(t *testing.T) {
	_, err := kvm.Open(filepath.Join(t.TempDir(), "kvm"))
	require.True(t, errors.Is(err, kvm.ErrNoDevice), "%v", err)
	require.True(t, strings.Contains(err.Error(), "modprobe kvm_intel"), "%v", err)
}
