//go:build linux

package uffd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Fallback says how a page fault is resolved when no data is served for it:
// its handler failed, or the Userfaultfd was closed while the fault waited.
// Config.Fallback has no default: the caller writes down what such a thread
// sees.
type Fallback int

const (
	_ Fallback = iota // the zero value: not chosen, which Open refuses
	// Poison resolves the fault with UFFDIO_POISON (Linux 6.6): the access,
	// and every later access to that page, raises SIGBUS with BUS_MCEERR_AR,
	// as a hardware memory error would. A Go accessor running under
	// debug.SetPanicOnFault (package arena's) turns it into an error; a vCPU
	// gets KVM's hardware-poison path (KVM_RUN fails or the thread gets the
	// SIGBUS). Nobody reads data the snapshot did not hold. The page stays
	// poisoned until it is discarded (MADV_DONTNEED, MADV_REMOVE) or unmapped.
	Poison
	// ZeroFill resolves the fault with a page of zeros (UFFDIO_ZEROPAGE, or a
	// copy of zeros on hugetlb memory): the thread goes on reading zeros. Use
	// it only where zeros are the page's true contents or nobody will trust
	// them (the memory is being torn down).
	ZeroFill
)

func (f Fallback) String() string {
	switch f {
	case Poison:
		return "Poison"
	case ZeroFill:
		return "ZeroFill"
	}
	return fmt.Sprintf("Fallback(%d)", int(f))
}

// Config says what Open asks of the kernel.
type Config struct {
	// Required features: Open fails, with an error wrapping
	// errors.ErrUnsupported, if the kernel lacks any of them.
	Required Features
	// Optional features: asked for where the kernel has them. Features()
	// says which were granted.
	Optional Features
	// Fallback resolves faults that get no data (see Fallback). Required;
	// Poison adds FeaturePoison to Required.
	Fallback Fallback
}

// Userfaultfd is one userfaultfd: ranges registered for missing-page faults,
// the ioctls that resolve them, and the event queue. It is safe for
// concurrent use; see the package documentation for what runs concurrently.
type Userfaultfd struct {
	// mu is read-held across every system call on fd, so fd is never closed
	// (and its number reused) under one; Close write-holds it. A read holder
	// may block in poll: Close wakes it through stop first.
	mu      sync.RWMutex
	fd      int // -1 once closed
	closing atomic.Bool
	stop    *waker // readable once Close has begun

	granted  Features
	fallback Fallback
	basePage uintptr

	rmu     sync.Mutex               // serializes changes to ranges
	regions atomic.Pointer[[]region] // registered ranges, sorted, never modified in place

	smu     sync.Mutex
	servers map[*server]struct{} // running Serve loops, with the faults they hold

	// readSem serializes reading (poll and read) among Serve loops and
	// ReadEvents, so that events are numbered in the order the kernel gave
	// them (see order); done is closed when Close begins.
	readSem chan struct{}
	done    chan struct{}
	order   order
}

// sysUserfaultfd is the userfaultfd(2) system call; tests replace it to take
// the /dev/userfaultfd path.
var sysUserfaultfd = func(flags int) (int, error) {
	fd, _, e := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(flags), 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(fd), nil
}

// devicePath is /dev/userfaultfd; a variable for tests.
var devicePath = "/dev/userfaultfd"

// newFD makes a userfaultfd, nonblocking and close-on-exec: with the system
// call, or, when the kernel refuses it (vm.unprivileged_userfaultfd=0
// without CAP_SYS_PTRACE), through /dev/userfaultfd (Linux 6.1), whose
// access is governed by the node's permissions. Neither path sets
// UFFD_USER_MODE_ONLY, which would make the kernel's own accesses to
// registered memory — KVM's, a read(2) into it — SIGBUS instead of faults.
func newFD() (int, error) {
	const flags = unix.O_CLOEXEC | unix.O_NONBLOCK
	fd, err := sysUserfaultfd(flags)
	if err == nil {
		return fd, nil
	}
	if errors.Is(err, unix.ENOSYS) {
		return -1, fmt.Errorf("uffd: this kernel has no userfaultfd: %w (%w)", errors.ErrUnsupported, os.NewSyscallError("userfaultfd", err))
	}
	if !errors.Is(err, unix.EPERM) {
		return -1, fmt.Errorf("uffd: %w", os.NewSyscallError("userfaultfd", err))
	}
	dfd, derr := openDevice(flags)
	if derr == nil {
		return dfd, nil
	}
	return -1, fmt.Errorf("uffd: %w (vm.unprivileged_userfaultfd is 0 and the process lacks CAP_SYS_PTRACE), and %w: give this user read-write access to %s or set vm.unprivileged_userfaultfd=1",
		os.NewSyscallError("userfaultfd", err), derr, devicePath)
}

// openDevice makes a userfaultfd with /dev/userfaultfd's USERFAULTFD_IOC_NEW.
func openDevice(flags int) (int, error) {
	dev, err := unix.Open(devicePath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: devicePath, Err: err}
	}
	defer unix.Close(dev)
	fd, e := ioctlNewFD(dev, flags)
	if e != 0 {
		return -1, &os.PathError{Op: "ioctl USERFAULTFD_IOC_NEW", Path: devicePath, Err: e}
	}
	return fd, nil
}

var probed struct {
	sync.Mutex
	features Features
	ok       bool
}

// Supported reports the features this kernel's userfaultfd offers. It makes
// a throwaway userfaultfd the first time (UFFDIO_API can be issued once per
// descriptor, and asking for a feature the kernel lacks fails it), and
// remembers the answer.
func Supported() (Features, error) {
	probed.Lock()
	defer probed.Unlock()
	if probed.ok {
		return probed.features, nil
	}
	fd, err := newFD()
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	api := uffdioAPI{api: uffdAPI}
	if e := ioctlAPIArg(fd, &api); e != 0 {
		return 0, fmt.Errorf("uffd: probing features: %w", os.NewSyscallError("ioctl UFFDIO_API", e))
	}
	probed.features, probed.ok = Features(api.features), true
	return probed.features, nil
}

// Open makes a userfaultfd and completes the UFFDIO_API handshake, asking for
// cfg.Required and whatever of cfg.Optional the kernel has. Features says
// what was granted.
func Open(cfg Config) (*Userfaultfd, error) {
	if cfg.Fallback != Poison && cfg.Fallback != ZeroFill {
		return nil, invalid("Open", "Config.Fallback must be Poison or ZeroFill (what a thread waiting on a page that gets no data is given)")
	}
	if bad := (cfg.Required | cfg.Optional) &^ featureHandled; bad != 0 {
		return nil, invalid("Open", "features %v change how faults are delivered, or go with ioctls this package does not wrap", bad)
	}
	required := cfg.Required
	if cfg.Fallback == Poison {
		required |= FeaturePoison
	}
	avail, err := Supported()
	if err != nil {
		return nil, err
	}
	if missing := required &^ avail; missing != 0 {
		hint := ""
		if missing&FeaturePoison != 0 {
			hint = " (the Poison fallback needs Linux 6.6; choose ZeroFill on older kernels)"
		}
		return nil, fmt.Errorf("uffd: the kernel lacks %v%s: %w", missing, hint, errors.ErrUnsupported)
	}
	want := (required | cfg.Optional) & avail
	fd, err := newFD()
	if err != nil {
		return nil, err
	}
	api := uffdioAPI{api: uffdAPI, features: uint64(want)}
	if e := ioctlAPIArg(fd, &api); e != 0 {
		unix.Close(fd)
		return nil, fmt.Errorf("uffd: handshake asking for %v: %w", want, os.NewSyscallError("ioctl UFFDIO_API", e))
	}
	stop, err := newWaker()
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	u := &Userfaultfd{
		fd:       fd,
		stop:     stop,
		granted:  want,
		fallback: cfg.Fallback,
		basePage: uintptr(os.Getpagesize()),
		servers:  map[*server]struct{}{},
		readSem:  make(chan struct{}, 1),
		done:     make(chan struct{}),
	}
	u.order.init()
	u.regions.Store(&[]region{})
	return u, nil
}

// Features reports the features the kernel granted: cfg.Required, and the
// part of cfg.Optional it has.
func (u *Userfaultfd) Features() Features { return u.granted }

// Fallback reports how faults that get no data are resolved.
func (u *Userfaultfd) Fallback() Fallback { return u.fallback }

// enter read-locks u for a system call on its descriptor, or fails after Close.
func (u *Userfaultfd) enter(op string) (int, error) {
	u.mu.RLock()
	if u.fd < 0 {
		u.mu.RUnlock()
		return -1, closedError(op)
	}
	return u.fd, nil
}

func (u *Userfaultfd) leave() { u.mu.RUnlock() }

// Close stops every Serve and ReadEvents, resolves the faults still waiting,
// and releases the userfaultfd. It never blocks on a fault or a handler, and
// a second Close returns nil.
//
// The faults resolved are those still queued and those a Serve loop had read
// but not yet served (its handler's next ioctl fails with fs.ErrClosed). Each
// gets the Fallback: Poison, so the thread gets SIGBUS, or ZeroFill, so it
// reads zeros. Faults read with ReadEvents are the reader's to resolve, and a
// fault whose wait a signal interrupted is off the queue until its access is
// retried: if Close drains the queue in that instant, it misses it (see the
// package documentation).
//
// Once the descriptor is released the kernel unregisters every range and
// wakes any fault that arrived meanwhile. From then on, a page that was never
// served fills from the kernel's normal fault path — zeros for anonymous
// memory, the page cache (or zeros) for shmem and hugetlbfs — as if the
// userfaultfd had never been there. Closing with data pages unserved loses
// that data silently, so Close reports it: if any range was still registered
// (not Unregistered, not unmapped), the descriptor is released all the same
// and the error wraps ErrRegistered, naming them. Unregister first when
// falling back to the normal fault path is what is meant.
func (u *Userfaultfd) Close() error {
	if !u.closing.Swap(true) {
		close(u.done)
	}
	u.stop.wake()
	u.order.shutdown()
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.fd < 0 {
		return nil
	}
	errSettle := u.settle(u.fd)
	errLeft := u.stillRegistered()
	err := unix.Close(u.fd)
	u.fd = -1
	u.stop.close()
	if err != nil {
		err = fmt.Errorf("uffd: %w", os.NewSyscallError("close", err))
	}
	return errors.Join(errSettle, errLeft, err)
}

// settle resolves, with the fallback, every fault still queued and every
// fault a Serve loop holds. Called by Close with u.mu write-held, so no other
// system call on fd is under way and no Serve can read more.
func (u *Userfaultfd) settle(fd int) error {
	var faults []Event
	u.smu.Lock()
	for s := range u.servers {
		faults = append(faults, s.take()...)
	}
	u.smu.Unlock()
	raw := make([]byte, 64*msgSize)
	evs := make([]Event, 64)
	deadline := time.Now().Add(10 * time.Second)
	for attempt := 0; ; attempt++ {
		// Reading completes queued Remove and Unmap events, which lets the
		// madvise or munmap behind them finish; their faults come with them.
		for {
			n, errno := u.readOnce(fd, raw, evs)
			if errno != 0 || n == 0 {
				break
			}
			for _, ev := range evs[:n] {
				if ev.Kind == PageFault {
					faults = append(faults, ev)
				}
			}
		}
		var again []Event
		var errs []error
		for _, ev := range faults {
			err := u.resolve(fd, ev)
			if errors.Is(err, ErrAgain) {
				again = append(again, ev)
			} else if err != nil {
				errs = append(errs, err)
			}
		}
		if len(again) == 0 {
			return errors.Join(errs...)
		}
		if time.Now().After(deadline) {
			errs = append(errs, fmt.Errorf("uffd: Close: %d faults not resolved with %v: the address space kept changing; the kernel wakes them into the normal fault path: %w", len(again), u.fallback, ErrAgain))
			return errors.Join(errs...)
		}
		faults = again
		backoff(attempt)
	}
}

// stillRegistered reports the tracked ranges that are still mapped and
// registered for missing faults ("um" in smaps' VmFlags): those whose pages
// never served fall back to the normal fault path once the descriptor is
// released. A range unmapped without FeatureEventUnmap is still tracked but
// no longer registered, and is not reported.
func (u *Userfaultfd) stillRegistered() error {
	var left []string
	var errs []error
	for _, r := range *u.regions.Load() {
		err := readSmaps(r.start, r.end, func(v vma) {
			if slices.Contains(v.flags, "um") {
				left = append(left, fmt.Sprintf("[%#x, +%#x)", max(v.start, r.start), min(v.end, r.end)-max(v.start, r.start)))
			}
		})
		if err != nil {
			errs = append(errs, fmt.Errorf("uffd: Close: cannot tell whether [%#x, +%#x) is still registered: %w", r.start, r.end-r.start, err))
		}
	}
	u.regions.Store(&[]region{})
	if len(left) > 0 {
		errs = append(errs, fmt.Errorf("uffd: Close with %d ranges still registered (%s): their pages never served now fill from the normal fault path (zeros or the page cache); Unregister first when that is meant: %w",
			len(left), strings.Join(left, ", "), ErrRegistered))
	}
	return errors.Join(errs...)
}

// backoff waits a little longer each attempt, for a thread to finish the
// madvise or munmap whose event another reader took.
func backoff(attempt int) {
	if attempt < 4 {
		runtime.Gosched()
		return
	}
	d := 10 * time.Microsecond << min(attempt-4, 7)
	time.Sleep(min(d, time.Millisecond))
}

// waker is an eventfd that wakes poll: written once, it stays readable.
type waker struct {
	mu sync.Mutex
	fd int // -1 once closed
}

func newWaker() (*waker, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("uffd: %w", os.NewSyscallError("eventfd", err))
	}
	return &waker{fd: fd}, nil
}

func (w *waker) wake() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.fd >= 0 {
		var one [8]byte
		binary.NativeEndian.PutUint64(one[:], 1)
		_, _ = unix.Write(w.fd, one[:])
	}
}

func (w *waker) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.fd >= 0 {
		unix.Close(w.fd)
		w.fd = -1
	}
}
