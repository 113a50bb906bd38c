package kvm

import (
	"errors"
	"fmt"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// What is not a KVM VM or vCPU is refused before anything is used.
func TestCheckKindRefusesOtherFDs(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	closed, err := unix.Dup(int(r.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(closed)
	for what, fd := range map[string]int{"negative": -1, "pipe": int(r.Fd()), "closed": closed} {
		if err := checkKind(fd, "kvm-vm"); !errors.Is(err, ErrNotKVMFD) {
			t.Errorf("%s fd: %v; want ErrNotKVMFD", what, err)
		}
	}
}

// Borrowed works on a close-on-exec duplicate and leaves the caller's
// descriptor alone; Owned takes the descriptor itself.
func TestTakeOwnership(t *testing.T) {
	// Raw descriptors, not an *os.File: Owned hands fd to a new file, and
	// an *os.File left holding it would close it again from its finalizer,
	// whatever the number had become by then (another test's directory fd).
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[1])
	fd := p[0]
	f, err := take(fd, Borrowed, "x")
	if err != nil {
		t.Fatal(err)
	}
	if int(f.Fd()) == fd {
		t.Fatal("Borrowed did not duplicate")
	}
	if flags, err := unix.FcntlInt(f.Fd(), unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Fatalf("duplicate flags %#x, %v; want close-on-exec", flags, err)
	}
	f.Close()
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
		t.Fatalf("closing the duplicate closed the caller's fd: %v", err)
	}
	g, err := take(fd, Owned, "x")
	if err != nil || int(g.Fd()) != fd {
		t.Fatalf("Owned: fd %d, %v; want %d", g.Fd(), err, fd)
	}
	g.Close()
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil {
		t.Fatal("Owned: Close left the fd open")
	}
	if _, err := take(3, Ownership(7), "x"); err == nil {
		t.Fatal("an unknown ownership was accepted")
	}
}

func TestErrUnsupportedIsTheStandardOne(t *testing.T) {
	err := fmt.Errorf("%w: KVM_CAP_X", ErrUnsupported)
	if !errors.Is(err, ErrUnsupported) || !errors.Is(err, errors.ErrUnsupported) {
		t.Fatalf("%v does not match both ErrUnsupported", err)
	}
}
