package kvm_test

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/gmem-vmm/gmem/internal/testenv"
	"github.com/gmem-vmm/gmem/kvm"
	"golang.org/x/sys/unix"
)

func TestOpenMissingDevice(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kvm")
	d, err := kvm.Open(path)
	if !errors.Is(err, kvm.ErrNoDevice) || d != nil {
		t.Fatalf("Open(%s) = %v, %v; want ErrNoDevice", path, d, err)
	}
	if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "modprobe") {
		t.Fatalf("error does not say what is missing and what to do: %v", err)
	}
}

// TestOpenNotKVM opens things that exist but are not /dev/kvm: each is
// ErrNoDevice with a message saying so, and nothing is left open.
func TestOpenNotKVM(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("not kvm"), 0o600); err != nil {
		t.Fatal(err)
	}
	fds := countFDs(t)
	for _, path := range []string{"/dev/null", "/dev/zero", file, dir} {
		d, err := kvm.Open(path)
		if !errors.Is(err, kvm.ErrNoDevice) || d != nil {
			t.Errorf("Open(%s) = %v, %v; want ErrNoDevice", path, d, err)
			continue
		}
		if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), kvm.DefaultPath) {
			t.Errorf("Open(%s): %v: should name the path and the KVM device", path, err)
		}
	}
	if got := countFDs(t); got != fds {
		t.Fatalf("%d fds open before, %d after failed Opens", fds, got)
	}
}

func countFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestOpenCopiedNode makes a second device node for KVM (mknod c 10 232,
// mode 0). Root opens it anyway; a process without privileges gets
// ErrPermission, naming the node's owner and mode, from a child process
// that drops to nobody.
func TestOpenCopiedNode(t *testing.T) {
	testenv.KVM(t) // skips without KVM
	if os.Getuid() != 0 {
		t.Skip("mknod and dropping privileges need root")
	}
	dir := t.TempDir()
	node := filepath.Join(dir, "kvm-copy")
	if err := unix.Mknod(node, unix.S_IFCHR, int(unix.Mkdev(10, 232))); err != nil {
		t.Skipf("cannot make a device node here: %v", err)
	}
	if err := os.Chmod(node, 0); err != nil {
		t.Fatal(err)
	}
	d, err := kvm.Open(node)
	if err != nil {
		t.Fatalf("root opening a mode-0 copy of /dev/kvm: %v", err)
	}
	if d.Path() != node {
		t.Errorf("Path = %q, want %q", d.Path(), node)
	}
	d.Close()

	// The child runs this test binary as nobody, so the binary and the
	// node must be reachable by nobody.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	child := filepath.Join(dir, "kvm.test")
	if err := copyFile(exe, child); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(child)
	cmd.Env = append(os.Environ(), childNodeEnv+"="+node)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "child: ok") {
		t.Fatalf("child as nobody: %v\n%s", err, out)
	}
}

// TestMain runs TestOpenCopiedNode's child when asked to, instead of the
// tests. Where KVM cannot be opened (and GMEM_REQUIRE_KVM is not set), it
// skips the runnable examples, whose output needs KVM; the tests skip
// themselves through internal/testenv.
func TestMain(m *testing.M) {
	if node := os.Getenv(childNodeEnv); node != "" {
		os.Exit(openAsChild(node))
	}
	flag.Parse()
	if d, err := kvm.Open(""); err != nil {
		if !testenv.RequireKVM() {
			skip := "^Example"
			if s := flag.Lookup("test.skip").Value.String(); s != "" {
				skip = s + "|" + skip
			}
			flag.Set("test.skip", skip)
		}
	} else {
		d.Close()
	}
	os.Exit(m.Run())
}

const childNodeEnv = "GMEM_KVM_CHILD_NODE"

// openAsChild opens node, which this process may not open, and checks the
// error: exit status 0 and "child: ok" if it is right.
func openAsChild(node string) int {
	d, err := kvm.Open(node)
	if !errors.Is(err, kvm.ErrPermission) || d != nil {
		fmt.Printf("child: Open(%s) as uid %d = %v, %v; want ErrPermission\n", node, os.Getuid(), d, err)
		return 1
	}
	for _, want := range []string{node, "character device 10:232", "mode 0000", "uid 0", "udev rule", "usermod"} {
		if !strings.Contains(err.Error(), want) {
			fmt.Printf("child: %q lacks %q\n", err, want)
			return 1
		}
	}
	fmt.Println("child: ok")
	return 0
}

func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, b, 0o755)
}

func TestCapabilities(t *testing.T) {
	d := testenv.KVM(t)
	c, err := d.Capabilities()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", c)
	if !c.UserMemory || !c.SyncMMU {
		t.Errorf("KVM without USER_MEMORY or SYNC_MMU: %+v", c)
	}
	// KVM has offered at least 32 slots since 2.6.x; x86 offers 32764
	// (KVM_USER_MEM_SLOTS), and slot numbers are 16 bits.
	if c.Memslots < 32 || c.Memslots > 1<<16 {
		t.Errorf("Memslots = %d", c.Memslots)
	}
	if c.VCPUs < 1 {
		t.Errorf("VCPUs = %d", c.VCPUs)
	}
	if c.DirtyRingBytes < 0 || c.MultiAddressSpace < 0 {
		t.Errorf("negative count: %+v", c)
	}
	// Every field is Check of its capability.
	for _, q := range []struct {
		cap kvm.Cap
		got int
	}{
		{kvm.CapNrMemslots, c.Memslots}, {kvm.CapNrVCPUs, c.VCPUs}, {kvm.CapDirtyLogRing, c.DirtyRingBytes},
		{kvm.CapMultiAddressSpace, c.MultiAddressSpace}, {kvm.CapReadonlyMem, b2i(c.ReadonlyMem)},
		{kvm.CapManualDirtyLogProtect, b2i(c.ManualDirtyLog)}, {kvm.CapUserMemory2, b2i(c.UserMemory2)},
	} {
		n, err := d.Check(q.cap)
		if err != nil {
			t.Fatal(err)
		}
		if q.cap == kvm.CapNrMemslots || q.cap == kvm.CapNrVCPUs || q.cap == kvm.CapDirtyLogRing ||
			q.cap == kvm.CapMultiAddressSpace {
			if n != q.got {
				t.Errorf("Check(%v) = %d, Capabilities says %d", q.cap, n, q.got)
			}
		} else if b2i(n > 0) != q.got {
			t.Errorf("Check(%v) = %d, Capabilities says %d", q.cap, n, q.got)
		}
	}
	// A capability number no kernel knows yet is absent, not an error.
	// (Numbers are assigned in sequence and were near 245 in 2025. Some
	// hosts' KVM looks at the low 8 bits of the number only, so a
	// number of 256 or more would answer for another capability.)
	if n, err := d.Check(kvm.Cap(255)); n != 0 || err != nil {
		t.Errorf("Check(255) = %d, %v", n, err)
	}
	vm, err := d.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if vm.Capabilities() != c || vm.MaxSlots() != c.Memslots {
		t.Errorf("VM capabilities %+v, MaxSlots %d; device says %+v", vm.Capabilities(), vm.MaxSlots(), c)
	}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestDeviceClose: closing the device does not close the VMs made from
// it; the device itself then refuses use with ErrClosed.
func TestDeviceClose(t *testing.T) {
	testenv.KVM(t)
	fds := countFDs(t)
	d, err := kvm.Open("")
	if err != nil {
		t.Fatal(err)
	}
	vm, err := d.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := d.Check(kvm.CapUserMemory); !errors.Is(err, kvm.ErrClosed) {
		t.Errorf("Check after Close: %v", err)
	}
	if _, err := d.Capabilities(); !errors.Is(err, kvm.ErrClosed) {
		t.Errorf("Capabilities after Close: %v", err)
	}
	if _, err := d.CreateVM(); !errors.Is(err, kvm.ErrClosed) {
		t.Errorf("CreateVM after Close: %v", err)
	}
	host := anon(t, 1<<20)
	if err := vm.SetSlot(kvm.Slot{ID: 0, GPA: 0, Size: 1 << 20, HostAddr: host.Addr()}); err != nil {
		t.Fatalf("VM after its device was closed: %v", err)
	}
	c, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatalf("vCPU after the device was closed: %v", err)
	}
	if c.ID() != 0 {
		t.Errorf("ID = %d", c.ID())
	}
	if _, err := vm.CreateVCPU(0); err == nil {
		t.Error("a second vCPU 0 was created")
	}
	if err := vm.Close(); err != nil {
		t.Fatal(err)
	}
	if got := countFDs(t); got != fds {
		t.Fatalf("%d fds before, %d after closing device, VM and vCPU", fds, got)
	}
}
