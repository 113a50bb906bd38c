package kvm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"slices"
	"strconv"

	"golang.org/x/sys/unix"
)

// Node is what stat(2) says about the KVM device node: all that
// AccessAdvice needs to say what would let a process open it.
type Node struct {
	Path   string
	Exists bool        // false: the path does not exist
	Err    error       // stat failed for another reason (a directory above it that may not be searched)
	Mode   fs.FileMode // type and permission bits, as in fs.FileInfo
	Rdev   uint64      // device number of a character device
	UID    uint32
	GID    uint32
	Owner  string // the name of UID, "" if it has none
	Group  string // the name of GID, "" if it has none
}

// Caller is the process that opens the node: its effective uid and every
// group it holds (the effective gid included).
type Caller struct {
	UID    int
	Groups []int
}

// ThisProcess returns the Caller of this process.
func ThisProcess() Caller {
	groups, _ := os.Getgroups()
	return Caller{UID: os.Geteuid(), Groups: append(groups, os.Getegid())}
}

// StatNode stats the node at path.
func StatNode(path string) Node {
	n := Node{Path: path}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		if !errors.Is(err, unix.ENOENT) {
			n.Exists, n.Err = true, err
		}
		return n
	}
	n.Exists, n.UID, n.GID, n.Rdev = true, st.Uid, st.Gid, st.Rdev
	n.Mode = fs.FileMode(st.Mode & 0o777)
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFCHR:
		n.Mode |= fs.ModeDevice | fs.ModeCharDevice
	case unix.S_IFBLK:
		n.Mode |= fs.ModeDevice
	case unix.S_IFDIR:
		n.Mode |= fs.ModeDir
	case unix.S_IFIFO:
		n.Mode |= fs.ModeNamedPipe
	case unix.S_IFSOCK:
		n.Mode |= fs.ModeSocket
	}
	if u, err := user.LookupId(strconv.FormatUint(uint64(st.Uid), 10)); err == nil {
		n.Owner = u.Username
	}
	if g, err := user.LookupGroupId(strconv.FormatUint(uint64(st.Gid), 10)); err == nil {
		n.Group = g.Name
	}
	return n
}

// String describes the node: "character device 10:232, mode 0600, owner
// root (uid 0), group root (gid 0)".
func (n Node) String() string {
	switch {
	case !n.Exists:
		return "absent"
	case n.Err != nil:
		return "not stat-able: " + n.Err.Error()
	}
	kind := "file"
	switch {
	case n.Mode&fs.ModeCharDevice != 0:
		kind = fmt.Sprintf("character device %d:%d", unix.Major(n.Rdev), unix.Minor(n.Rdev))
	case n.Mode&fs.ModeDevice != 0:
		kind = "block device"
	case n.Mode.IsDir():
		kind = "directory"
	case n.Mode&fs.ModeNamedPipe != 0:
		kind = "pipe"
	case n.Mode&fs.ModeSocket != 0:
		kind = "socket"
	}
	return fmt.Sprintf("%s, mode %04o, owner %s, group %s", kind, n.Mode.Perm(), named(n.Owner, "uid", n.UID),
		named(n.Group, "gid", n.GID))
}

func named(name, kind string, id uint32) string {
	if name == "" {
		return fmt.Sprintf("%s %d", kind, id)
	}
	return fmt.Sprintf("%s (%s %d)", name, kind, id)
}

// udevRule is the rule that gives /dev/kvm to group kvm, mode 0660, at
// every boot and module load.
const udevRule = `KERNEL=="kvm", GROUP="kvm", MODE="0660"`

// AccessAdvice says what would let caller open node n read-write, from
// the node's actual mode, owner and group: that is, why it is refused and
// what helps. Joining the node's group helps only when that group may read
// and write it; a node that is root:root 0600 (as on some hosts) needs a kvm
// group, mode 0660 and a udev rule that keeps them, before joining helps.
func AccessAdvice(n Node, caller Caller) string {
	perm := n.Mode.Perm()
	elsewhere := "so the denial comes from elsewhere: a container that was not given the device (docker run " +
		"--device /dev/kvm), its device cgroup, SELinux or AppArmor, or a filesystem mounted nodev"
	group := n.Group
	if group == "" {
		group = strconv.FormatUint(uint64(n.GID), 10)
	}
	switch {
	case !n.Exists:
		return fmt.Sprintf("%s does not exist: the KVM module is not loaded, or this machine offers no hardware "+
			"virtualization. Load the module for this CPU (modprobe kvm_intel or modprobe kvm_amd); if that fails, "+
			"enable VT-x or AMD-V in the firmware, or nested virtualization if this is a VM", n.Path)
	case n.Err != nil:
		return fmt.Sprintf("%s cannot be examined (%v): a directory above it may not be searched by this user",
			n.Path, n.Err)
	case n.Mode&fs.ModeCharDevice == 0:
		return fmt.Sprintf("%s is not a character device: the KVM device is %s, character device 10:232", n.Path,
			DefaultPath)
	case caller.UID == 0:
		return "this process runs as root, which the mode does not restrict, " + elsewhere
	case perm&0o006 == 0o006:
		return fmt.Sprintf("mode %04o lets everyone read and write it, %s", perm, elsewhere)
	case perm&0o060 == 0o060 && n.GID != 0 && slices.Contains(caller.Groups, int(n.GID)):
		return fmt.Sprintf("this process is in group %s, which may read and write it, %s", group, elsewhere)
	case perm&0o060 == 0o060 && n.GID != 0:
		return fmt.Sprintf("its group %s may read and write it: add the user to that group (usermod -aG %s $USER), "+
			"then log in again (a running session keeps its groups; newgrp %s starts a shell with the new one), "+
			"or run as root", group, group, group)
	}
	why := fmt.Sprintf("its group %s may not read and write it (mode %04o), so joining that group does not help",
		group, perm)
	if perm&0o060 == 0o060 {
		why = fmt.Sprintf("its group is root (mode %04o), and joining root's group would give far more than KVM", perm)
	}
	return fmt.Sprintf("%s. Give the device to a kvm group with mode 0660: groupadd -f -r kvm; chgrp kvm %s; "+
		"chmod 0660 %s. That lasts until the next boot or module load; to keep it, add the udev rule %s to "+
		"/etc/udev/rules.d/65-kvm.rules, then udevadm control --reload-rules && udevadm trigger --name-match=kvm. "+
		"Then add the user to the group (usermod -aG kvm $USER) and log in again; or run as root", why, n.Path,
		n.Path, udevRule)
}
