//go:build amd64

package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/bobuhiro11/gokvm/machine"
	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/internal/procfs"
	"github.com/gmem-vmm/gmem/internal/units"
)

// ---- QEMU ----

// qemuBackend returns the QEMU memory backend object for backing b, or
// false when QEMU has no counterpart (QEMU advises MADV_HUGEPAGE on all its
// RAM, so plain anonymous memory without THP has none).
func qemuBackend(size units.Size, b BackingChoice) (string, bool) {
	switch b.Name {
	case BackingAnonTHP:
		return fmt.Sprintf("memory-backend-ram,id=m,size=%d", uint64(size)), true
	case BackingMemfd:
		return fmt.Sprintf("memory-backend-memfd,id=m,size=%d", uint64(size)), true
	case BackingHugetlb:
		return fmt.Sprintf("memory-backend-memfd,id=m,size=%d,hugetlb=on,hugetlbsize=%d", uint64(size), b.HugePage),
			true
	}
	return "", false
}

// qemuArgs is a QEMU command line that creates the memory backend, with
// or without preallocation by threads threads, and stops at the monitor
// prompt: no machine (-machine none), no devices, no guest code (-S).
func qemuArgs(size units.Size, b BackingChoice, threads int, prealloc bool, accel string) ([]string, bool) {
	obj, ok := qemuBackend(size, b)
	if !ok {
		return nil, false
	}
	if prealloc {
		obj += fmt.Sprintf(",prealloc=on,prealloc-threads=%d", threads)
	} else {
		obj += ",prealloc=off"
	}
	return []string{"-accel", accel, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
		"-S", "-object", obj, "-monitor", "stdio"}, true
}

// qemuJob is the QEMU peer: the time QEMU spends preallocating the
// backend, taken as the time from starting QEMU to its monitor prompt with
// prealloc=on minus the median of the same with prealloc=off. The off runs
// come first, after one untimed start that brings QEMU's binary into the
// page cache.
func qemuJob(qemu string, size units.Size, bk BackingChoice, threads int, haveKVM bool) (job, bool) {
	accel := "tcg"
	if haveKVM {
		accel = "kvm"
	}
	on, ok := qemuArgs(size, bk, threads, true, accel)
	if !ok {
		return job{}, false
	}
	off, _ := qemuArgs(size, bk, threads, false, accel)
	j := job{size: size, backing: bk.Name, method: fmt.Sprintf("qemu prealloc x%d", threads), peer: true,
		workers: threads}
	j.open = func(ctx context.Context) (func(context.Context) (sample, error), func() error, error) {
		var offs []time.Duration
		for i := range qemuBaselineRuns + 1 {
			d, _, err := qemuTimeToPrompt(ctx, qemu, off, uint64(size))
			if err != nil {
				return nil, nil, err
			}
			if i > 0 {
				offs = append(offs, d)
			}
		}
		base := median(offs)
		note := fmt.Sprintf("QEMU start to prompt without prealloc: %s (median of %d), subtracted",
			units.FormatDuration(base), len(offs))
		once := func(ctx context.Context) (sample, error) {
			s := sample{mapT: notApplicable, register: notApplicable, teardown: notApplicable, note: note}
			tOn, huge, err := qemuTimeToPrompt(ctx, qemu, on, uint64(size))
			if err != nil {
				return s, err
			}
			s.prefault = max(tOn-base, 0)
			s.huge, s.resident = huge, 1
			return s, nil
		}
		return once, func() error { return nil }, nil
	}
	return j, true
}

// qemuBaselineRuns is how many prealloc=off starts make the baseline.
const qemuBaselineRuns = 3

// qemuTimeout bounds one QEMU start.
const qemuTimeout = 10 * time.Minute

// qemuTimeToPrompt starts QEMU with args, times how long it takes to print
// its monitor prompt, reads how much of its memory is mapped huge, and
// quits it. QEMU's exit, which frees the memory, is not timed.
func qemuTimeToPrompt(ctx context.Context, qemu string, args []string, size uint64) (time.Duration, float64, error) {
	ctx, cancel := context.WithTimeout(ctx, qemuTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemu, args...)
	cmd.WaitDelay = 5 * time.Second
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return 0, 0, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return 0, 0, err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, 0, fmt.Errorf("starting %s: %w", qemu, err)
	}
	found := waitForPrompt(stdout, "(qemu)")
	d := time.Since(t0)
	huge := 0.0
	if found {
		huge = processHugeFraction(cmd.Process.Pid, size)
	}
	io.WriteString(stdin, "quit\n")
	stdin.Close()
	io.Copy(io.Discard, stdout)
	werr := cmd.Wait()
	if !found {
		if ctx.Err() != nil {
			return 0, 0, ctx.Err()
		}
		msg := lastLine(stderr.String())
		if msg == "" && werr != nil {
			msg = werr.Error()
		}
		return 0, 0, fmt.Errorf("%s exited before its monitor prompt: %s", qemu, msg)
	}
	return d, huge, nil
}

// waitForPrompt reads r until it has seen prompt, or r ends.
func waitForPrompt(r io.Reader, prompt string) bool {
	br := bufio.NewReader(r)
	var seen []byte
	for {
		c, err := br.ReadByte()
		if err != nil {
			return false
		}
		seen = append(seen, c)
		if bytes.HasSuffix(seen, []byte(prompt)) {
			return true
		}
		if len(seen) > 4096 {
			seen = seen[len(seen)-len(prompt):]
		}
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// processHugeFraction returns the bytes process pid maps with huge pages
// (THP, shmem PMD, hugetlb) as a fraction of size, from its smaps_rollup.
func processHugeFraction(pid int, size uint64) float64 {
	r, err := procfs.SmapsRollup(pid)
	if err != nil || size == 0 {
		return 0
	}
	return min(1, float64(hugeBytes(&r))/float64(size))
}

// hugeBytes is what v maps with huge pages: THP, shmem or file PMDs, hugetlb.
func hugeBytes(v *procfs.VMA) int64 {
	return v.AnonHugePages + v.ShmemPmdMapped + v.FilePmdMapped + v.SharedHugetlb + v.PrivateHugetlb
}

// qemuVersion returns the first line of qemu --version.
func qemuVersion(qemu string) string {
	out, err := exec.Command(qemu, "--version").Output()
	if err != nil {
		return qemu
	}
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}

// ---- gokvm ----

// GokvmMinSize is the smallest guest machine.New accepts.
const GokvmMinSize = units.Size(machine.MinMemSize)

// gokvmJob is the gokvm peer: the whole of gokvm's machine.New(kvmPath, 1,
// size). It needs no kernel image: New opens KVM, creates the VM (TSS,
// identity map, IRQ chip, PIT) and one vCPU with its CPUID, mmaps guest RAM
// as MAP_SHARED|MAP_ANONYMOUS (shmem, populated 4 KiB at a time like a
// memfd), registers it as slot 0, and writes an 8-byte poison pattern over
// everything above 1 MiB, which populates it page by page from Go. That
// write is gokvm's prefault; the loading of a kernel comes later
// (LoadLinux) and is not part of the figure.
//
// machine.Machine has no Close, so the run releases what New made itself:
// it closes the VM and vCPU fds New opened and unmaps guest RAM and the
// kvm_run pages, found by comparing /proc/self/fd and /proc/self/maps with
// what was there before. The /dev/kvm fd belongs to an *os.File inside
// gokvm whose finalizer closes it; a GC after the run lets it.
func gokvmJob(kvmPath string, size units.Size) job {
	j := job{size: size, backing: "shmem", method: "gokvm machine.New", peer: true, workers: 1}
	j.open = func(context.Context) (func(context.Context) (sample, error), func() error, error) {
		once := func(context.Context) (s sample, err error) {
			s = sample{mapT: notApplicable, register: notApplicable}
			before, err := snapshotProc()
			if err != nil {
				return s, err
			}
			t0 := time.Now()
			_, err = machine.New(kvmPath, 1, int(size))
			s.prefault = time.Since(t0)
			after, serr := snapshotProc()
			if serr != nil {
				return s, errors.Join(err, serr)
			}
			if mem, ok := after.newShared(before, uint64(size)); ok {
				s.huge, s.resident = smapsFractions(mem.Start, uint64(size))
			}
			t1 := time.Now()
			rerr := releaseGokvm(before, after, uint64(size))
			s.teardown = time.Since(t1)
			runtime.GC() // lets the finalizer of gokvm's *os.File close /dev/kvm
			if err != nil {
				return s, fmt.Errorf("machine.New: %w", errors.Join(err, rerr))
			}
			return s, rerr
		}
		return once, func() error { return nil }, nil
	}
	return j
}

// gokvmVersion is the version of gokvm built in.
func gokvmVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/bobuhiro11/gokvm" {
				return d.Path + " " + d.Version
			}
		}
	}
	return "github.com/bobuhiro11/gokvm"
}

// procSnapshot is this process's open fds (with their targets) and
// mappings at one moment.
type procSnapshot struct {
	fds  map[int]string
	vmas map[uintptr]procfs.VMA // by start address, from /proc/self/maps
}

func snapshotProc() (procSnapshot, error) {
	s := procSnapshot{fds: map[int]string{}, vmas: map[uintptr]procfs.VMA{}}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return s, err
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if t, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil {
			s.fds[fd] = t
		}
	}
	vmas, err := procfs.Maps()
	if err != nil {
		return s, err
	}
	for _, v := range vmas {
		s.vmas[v.Start] = v
	}
	return s, nil
}

// newShared returns the shared mapping of exactly size bytes that is in s
// but not in before: gokvm's guest RAM.
func (s procSnapshot) newShared(before procSnapshot, size uint64) (procfs.VMA, bool) {
	for start, v := range s.vmas {
		if _, old := before.vmas[start]; old {
			continue
		}
		if uint64(v.End-v.Start) == size && strings.HasSuffix(v.Perms, "s") && !strings.HasPrefix(v.Path, "anon_inode:") {
			return v, true
		}
	}
	return procfs.VMA{}, false
}

// releaseGokvm closes the KVM VM and vCPU fds and unmaps the guest RAM and
// kvm_run mappings that appeared between before and after. Nothing that
// existed before is touched, nor the /dev/kvm fd (owned by an *os.File).
func releaseGokvm(before, after procSnapshot, size uint64) error {
	var errs []error
	// Unmap first: guest RAM, then the vCPUs' kvm_run pages.
	for start, v := range after.vmas {
		if _, old := before.vmas[start]; old {
			continue
		}
		guestRAM := uint64(v.End-v.Start) == size && strings.HasSuffix(v.Perms, "s") &&
			!strings.HasPrefix(v.Path, "anon_inode:")
		if guestRAM || strings.HasPrefix(v.Path, "anon_inode:kvm-vcpu") {
			if _, _, e := unix.Syscall(unix.SYS_MUNMAP, v.Start, v.End-v.Start, 0); e != 0 {
				errs = append(errs, fmt.Errorf("munmap %s at %#x: %w", v.Path, v.Start, e))
			}
		}
	}
	for fd, target := range after.fds {
		if t, old := before.fds[fd]; old && t == target {
			continue
		}
		if strings.HasPrefix(target, "anon_inode:kvm-vcpu") || strings.HasPrefix(target, "anon_inode:kvm-vm") {
			if err := unix.Close(fd); err != nil {
				errs = append(errs, fmt.Errorf("close %s (fd %d): %w", target, fd, err))
			}
		}
	}
	return errors.Join(errs...)
}

// smapsFractions returns the huge and resident fractions of size bytes
// of the VMA starting at start, from /proc/self/smaps.
func smapsFractions(start uintptr, size uint64) (huge, resident float64) {
	vmas, err := procfs.SmapsRange(start, start+1)
	if err != nil || len(vmas) == 0 || vmas[0].Start != start || size == 0 {
		return 0, 0
	}
	v := &vmas[0]
	return float64(hugeBytes(v)) / float64(size), float64(v.Rss) / float64(size)
}
