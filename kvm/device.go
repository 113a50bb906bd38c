package kvm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
	"syscall"

	gokvm "github.com/bobuhiro11/gokvm/kvm"
)

// DefaultPath is the KVM device node.
const DefaultPath = "/dev/kvm"

// APIVersion is the only KVM API version there has ever been (KVM_API_VERSION).
const APIVersion = 12

// Device is an open KVM device (/dev/kvm). It is safe for concurrent use.
type Device struct {
	mu   sync.RWMutex
	f    *os.File
	path string
}

// Open opens the KVM device at path (DefaultPath if empty) and checks its
// API version. A missing device, or a path that is not a KVM device (a
// directory, a regular file, another character device), is ErrNoDevice; one
// this process may not open read-write is ErrPermission; each error says
// what to do about it. Another API version is ErrAPIVersion.
func Open(path string) (*Device, error) {
	if path == "" {
		path = DefaultPath
	}
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, openError(path, err)
	}
	d := &Device{f: f, path: path}
	v, err := retry(func() (uintptr, error) { return gokvm.GetAPIVersion(f.Fd()) })
	if err != nil {
		f.Close()
		if errors.Is(err, syscall.ENOTTY) || errors.Is(err, syscall.EINVAL) {
			// Any file that is not /dev/kvm: a regular file, a pipe, another
			// character device such as /dev/null.
			return nil, fmt.Errorf("%w: %s is not a KVM device (%v); the KVM device is %s, character device 10:232",
				ErrNoDevice, path, StatNode(path), DefaultPath)
		}
		return nil, fmt.Errorf("kvm: %s: %w", path, ioctlErr("KVM_GET_API_VERSION", err))
	}
	if v != APIVersion {
		f.Close()
		return nil, fmt.Errorf("%w: %s reports %d, this package speaks %d", ErrAPIVersion, path, v, APIVersion)
	}
	return d, nil
}

func openError(path string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%w: %s", ErrNoDevice, AccessAdvice(Node{Path: path}, Caller{}))
	case errors.Is(err, syscall.ENODEV), errors.Is(err, syscall.ENXIO):
		return fmt.Errorf("%w: %s exists but no KVM driver is bound to it (%v): load kvm_intel or kvm_amd", ErrNoDevice,
			path, err)
	case errors.Is(err, syscall.EISDIR):
		return fmt.Errorf("%w: %s is a directory, not the KVM device (%s)", ErrNoDevice, path, DefaultPath)
	case errors.Is(err, fs.ErrPermission):
		n := StatNode(path)
		return fmt.Errorf("%w: %s (%v) must be readable and writable by this process: %s", ErrPermission, path, n,
			AccessAdvice(n, ThisProcess()))
	}
	return fmt.Errorf("kvm: opening %s: %w", path, err)
}

// Path returns the device path.
func (d *Device) Path() string { return d.path }

// Close closes the device. VMs created from it stay usable. Closing twice
// returns nil.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.f == nil {
		return nil
	}
	err := d.f.Close()
	d.f = nil
	return err
}

// fd runs fn with the device fd under the read lock.
func (d *Device) withFD(fn func(fd uintptr) error) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.f == nil {
		return fmt.Errorf("kvm: %w", errDeviceClosed)
	}
	return fn(d.f.Fd())
}

// retry calls fn until it fails with something other than EINTR.
func retry(fn func() (uintptr, error)) (uintptr, error) {
	for {
		r, err := fn()
		if !errors.Is(err, syscall.EINTR) {
			return r, err
		}
	}
}

func retryErr(fn func() error) error {
	_, err := retry(func() (uintptr, error) { return 0, fn() })
	return err
}
