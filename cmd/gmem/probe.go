package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"time"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/internal/units"
	"github.com/gmem-vmm/gmem/kvm"
	"golang.org/x/sys/unix"
)

// ProbeCmd is `gmem probe`: what this host offers guests.
type ProbeCmd struct {
	JSON        bool   `help:"Print the report as JSON instead of a table."`
	KVMPath     string `name:"kvm" default:"/dev/kvm" placeholder:"PATH" help:"KVM device to probe (default: ${default})."`
	NoMeasure   bool   `help:"Do not time populating anonymous and memfd memory (the advice then has no figures)."`
	MeasureSize Size   `default:"64M" placeholder:"SIZE" help:"Bytes populated per backing when timing (default 64M)."`
}

// Validate checks the flags on their own, before the host is looked at:
// kong calls it while parsing, so a bad value exits 2.
func (c *ProbeCmd) Validate() error {
	if c.MeasureSize < 2*MiB || c.MeasureSize%(2*MiB) != 0 {
		return fmt.Errorf("--measure-size %v: must be a positive multiple of 2 MiB", c.MeasureSize)
	}
	return nil
}

// Run probes the host and prints the report.
func (c *ProbeCmd) Run(env *Env) error {
	if !c.NoMeasure {
		if err := checkFits(env.Root, c.MeasureSize, "--measure-size"); err != nil {
			return err
		}
	}
	p := probe(env.Ctx, hostProber(env.Root, c.KVMPath, !c.NoMeasure, uint64(c.MeasureSize)))
	if err := env.Ctx.Err(); err != nil {
		return fmt.Errorf("%w: probe stopped", errInterrupted)
	}
	if c.JSON {
		enc := json.NewEncoder(env.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(p)
	}
	return renderProbe(env.Stdout, p)
}

// Probe is what gmem probe found out about the host.
type Probe struct {
	Kernel        string        `json:"kernel"`
	Memory        MemInfo       `json:"memory"`
	KVM           KVMReport     `json:"kvm"`
	THP           THPModes      `json:"transparent_hugepages"`
	HugePools     []HugePool    `json:"hugepage_pools"`
	Memlock       Memlock       `json:"memlock"`
	Overcommit    Overcommit    `json:"overcommit"`
	PopulateWrite Check         `json:"madv_populate_write"`
	MlockOnFault  Check         `json:"mlock2_onfault"`
	PopulateCost  *PopulateCost `json:"populate_cost,omitempty"`
	Advice        []string      `json:"advice"`
}

// KVMReport describes the KVM device.
type KVMReport struct {
	Path       string   `json:"path"`
	Present    bool     `json:"present"`
	Usable     bool     `json:"usable"` // opened read-write with the right API version
	APIVersion int      `json:"api_version,omitempty"`
	Error      string   `json:"error,omitempty"`
	Caps       *KVMCaps `json:"capabilities,omitempty"`
}

// KVMCaps are the memory-related KVM capabilities.
type KVMCaps struct {
	Memslots          int  `json:"memslots"`
	VCPUs             int  `json:"vcpus"`
	ReadonlyMem       bool `json:"readonly_mem"`
	UserMemory2       bool `json:"user_memory2"`
	GuestMemfd        bool `json:"guest_memfd"`
	ManualDirtyLog    bool `json:"manual_dirty_log"`
	DirtyRingBytes    int  `json:"dirty_ring_bytes"`
	SyncMMU           bool `json:"sync_mmu"`
	MemoryFaultInfo   bool `json:"memory_fault_info"`
	MultiAddressSpace int  `json:"address_spaces"`
}

// Memlock is RLIMIT_MEMLOCK; -1 is unlimited.
type Memlock struct {
	Soft       int64  `json:"soft_bytes"`
	Hard       int64  `json:"hard_bytes"`
	CapIPCLock bool   `json:"cap_ipc_lock"` // the process is exempt from the limit
	Error      string `json:"error,omitempty"`
}

// Overcommit is vm.overcommit_memory.
type Overcommit struct {
	Mode    int    `json:"mode"` // -1 if unreadable
	Meaning string `json:"meaning"`
}

// Check is the outcome of trying a system call on a small mapping.
type Check struct {
	Works bool   `json:"works"`
	Error string `json:"error,omitempty"`
}

// PopulateCost is the measured cost of populating the same number of bytes
// of anonymous memory with transparent hugepages and of a memfd.
type PopulateCost struct {
	Size      uint64        `json:"size_bytes"`
	AnonTHP   time.Duration `json:"anon_thp_ns"`
	Memfd     time.Duration `json:"memfd_ns"`
	AnonHuge  float64       `json:"anon_thp_huge_fraction"`
	MemfdHuge float64       `json:"memfd_huge_fraction"`
	Method    string        `json:"method"`
}

// Ratio is how many times longer the memfd took.
func (c *PopulateCost) Ratio() float64 {
	if c.AnonTHP <= 0 {
		return 0
	}
	return float64(c.Memfd) / float64(c.AnonTHP)
}

// prober is where probe gets each fact, so tests can substitute a host.
type prober struct {
	root          fs.FS
	uname         func() (string, error)
	kvm           func() KVMReport
	memlock       func() (soft, hard int64, err error)
	populateWrite func() error
	mlockOnFault  func() error
	// measure times the populate of anonymous+THP and memfd memory; nil
	// skips it.
	measure func(ctx context.Context) (*PopulateCost, error)
}

// probe fills a Probe from p.
func probe(ctx context.Context, p prober) *Probe {
	r := &Probe{}
	if k, err := p.uname(); err == nil {
		r.Kernel = k
	} else {
		r.Kernel = "unknown: " + err.Error()
	}
	r.Memory, _ = readMeminfo(p.root)
	r.KVM = p.kvm()
	r.THP = readTHP(p.root)
	r.HugePools = readHugePools(p.root)
	r.Memlock.CapIPCLock = hasCapIPCLock(p.root)
	if soft, hard, err := p.memlock(); err != nil {
		r.Memlock.Error = err.Error()
	} else {
		r.Memlock.Soft, r.Memlock.Hard = soft, hard
	}
	r.Overcommit.Mode = readOvercommit(p.root)
	r.Overcommit.Meaning = overcommitMeaning(r.Overcommit.Mode)
	r.PopulateWrite = check(p.populateWrite())
	r.MlockOnFault = check(p.mlockOnFault())
	if p.measure != nil && ctx.Err() == nil {
		if c, err := p.measure(ctx); err == nil {
			r.PopulateCost = c
		} else if ctx.Err() == nil {
			r.Advice = append(r.Advice, "Timing the populate of anonymous and memfd memory failed: "+err.Error())
		}
	}
	r.Advice = append(advise(r), r.Advice...)
	return r
}

func check(err error) Check {
	if err != nil {
		return Check{Error: err.Error()}
	}
	return Check{Works: true}
}

func overcommitMeaning(mode int) string {
	switch mode {
	case 0:
		return "heuristic"
	case 1:
		return "always overcommit"
	case 2:
		return "strict (no overcommit)"
	}
	return "unknown"
}

// hostProber probes the real host: root is its / (for /proc and /sys).
func hostProber(root fs.FS, kvmPath string, measure bool, measureSize uint64) prober {
	p := prober{
		root:          root,
		uname:         uname,
		kvm:           func() KVMReport { return probeKVM(kvmPath) },
		memlock:       memlockLimit,
		populateWrite: tryPopulateWrite,
		mlockOnFault:  tryMlockOnFault,
	}
	if measure {
		p.measure = func(ctx context.Context) (*PopulateCost, error) { return measurePopulate(ctx, measureSize) }
	}
	return p
}

func uname() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", err
	}
	return unix.ByteSliceToString(u.Sysname[:]) + " " + unix.ByteSliceToString(u.Release[:]) + " " +
		unix.ByteSliceToString(u.Machine[:]), nil
}

// probeKVM opens the KVM device at path and reads its capabilities.
func probeKVM(path string) KVMReport {
	r := KVMReport{Path: path}
	r.Present = kvm.StatNode(path).Exists
	d, err := kvm.Open(path)
	if err != nil {
		r.Error = err.Error()
		return r
	}
	defer d.Close()
	r.Usable, r.APIVersion = true, kvm.APIVersion
	c, err := d.Capabilities()
	if err != nil {
		r.Error = err.Error()
		return r
	}
	r.Caps = &KVMCaps{Memslots: c.Memslots, VCPUs: c.VCPUs, ReadonlyMem: c.ReadonlyMem, UserMemory2: c.UserMemory2,
		GuestMemfd: c.GuestMemfd, ManualDirtyLog: c.ManualDirtyLog, DirtyRingBytes: c.DirtyRingBytes,
		SyncMMU: c.SyncMMU, MemoryFaultInfo: c.MemoryFaultInfo, MultiAddressSpace: c.MultiAddressSpace}
	return r
}

func memlockLimit() (soft, hard int64, err error) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &rl); err != nil {
		return 0, 0, fmt.Errorf("getrlimit(RLIMIT_MEMLOCK): %w", err)
	}
	conv := func(v uint64) int64 {
		if v == unix.RLIM_INFINITY {
			return -1
		}
		return int64(v)
	}
	return conv(rl.Cur), conv(rl.Max), nil
}

// tryPopulateWrite tries madvise(MADV_POPULATE_WRITE) on a two-page mapping.
func tryPopulateWrite() error {
	b, err := unix.Mmap(-1, 0, 2*4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("mmap: %w", err)
	}
	defer unix.Munmap(b)
	if err := unix.Madvise(b, unix.MADV_POPULATE_WRITE); err != nil {
		if errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("madvise(MADV_POPULATE_WRITE): %w (Linux 5.14 or later is needed)", err)
		}
		return fmt.Errorf("madvise(MADV_POPULATE_WRITE): %w", err)
	}
	return nil
}

// tryMlockOnFault tries mlock2(MLOCK_ONFAULT), through package arena as
// guestmem's LockOnFault does, on a two-page mapping.
func tryMlockOnFault() error {
	m, err := arena.NewAnon(2*4096, arena.Private())
	if err != nil {
		return err
	}
	defer m.Close()
	if err := m.LockOnFault(0, 2*4096); err != nil {
		return err
	}
	return m.Unlock(0, 2*4096)
}

// measurePopulate times populating size bytes of anonymous memory with
// MADV_HUGEPAGE and of a memfd: one untimed warm-up each, then the median
// of three, interleaved so that drifts in the host hit both alike.
func measurePopulate(ctx context.Context, size uint64) (*PopulateCost, error) {
	anon, _ := backingByName(backingAnonTHP, 0)
	memfd, _ := backingByName(backingMemfd, 0)
	c := &PopulateCost{Size: size, Method: "madvise(MADV_POPULATE_WRITE), 1 thread, median of 3 after 1 warm-up"}
	if tryPopulateWrite() != nil {
		c.Method = "touching each 4 KiB page, 1 thread, median of 3 after 1 warm-up"
	}
	var ta, tm []time.Duration
	for i := range 4 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		d, huge, err := timePopulateOnce(ctx, size, anon)
		if err != nil {
			return nil, fmt.Errorf("anonymous: %w", err)
		}
		if i > 0 {
			ta, c.AnonHuge = append(ta, d), huge
		}
		if d, huge, err = timePopulateOnce(ctx, size, memfd); err != nil {
			return nil, fmt.Errorf("memfd: %w", err)
		}
		if i > 0 {
			tm, c.MemfdHuge = append(tm, d), huge
		}
	}
	c.AnonTHP, c.Memfd = median(ta), median(tm)
	return c, nil
}

// timePopulateOnce maps size bytes of b, times populating them from one
// thread, and unmaps them.
func timePopulateOnce(ctx context.Context, size uint64, b Backing) (time.Duration, float64, error) {
	p, err := mapPlain(size, b, false)
	if err != nil {
		return 0, 0, err
	}
	defer p.close()
	t0 := time.Now()
	if err := populateDirect(p.b, b.granule(), 1); err != nil {
		if !errors.Is(err, unix.EINVAL) {
			return 0, 0, err
		}
		t0 = time.Now()
		if err := touchPages(ctx, p.b); err != nil {
			return 0, 0, err
		}
	}
	d := time.Since(t0)
	huge, _ := p.hugeFraction()
	return d, huge, nil
}

// advise draws advice from what the probe found.
func advise(p *Probe) []string {
	var a []string
	switch {
	case !p.KVM.Present:
		a = append(a, fmt.Sprintf("No %s: guests cannot run here. %s. gmem bench will skip KVM registration "+
			"and the gokvm peer.", p.KVM.Path, kvm.AccessAdvice(kvm.Node{Path: p.KVM.Path}, kvm.Caller{})))
	case !p.KVM.Usable:
		a = append(a, fmt.Sprintf("%s is present but not usable: %s", p.KVM.Path, p.KVM.Error))
	}
	if c := p.KVM.Caps; c != nil {
		if !c.ManualDirtyLog && c.DirtyRingBytes == 0 {
			a = append(a, "KVM has neither manual dirty-log protection nor a dirty ring: dirty tracking for live "+
				"migration write-protects all guest RAM at once when it starts.")
		}
	}
	switch p.THP.Enabled {
	case "never":
		a = append(a, "Transparent hugepages are off (enabled=never): anonymous guests are populated and mapped 4 KiB "+
			"at a time. echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (guestmem asks for them).")
	case "":
		a = append(a, "This kernel has no transparent hugepages: use a hugetlb pool for large guests.")
	}
	if p.THP.Enabled != "never" && p.THP.Enabled != "" {
		switch p.THP.Defrag {
		case "never", "defer":
			a = append(a, fmt.Sprintf("THP defrag=%s: a fault in MADV_HUGEPAGE memory does not compact, so on a "+
				"fragmented host guests silently get 4 KiB pages. madvise or defer+madvise suits VMMs.", p.THP.Defrag))
		}
	}
	switch p.THP.ShmemEnabled {
	case "never", "deny", "":
		msg := "Shmem hugepages are off"
		if p.THP.ShmemEnabled != "" {
			msg += " (shmem_enabled=" + p.THP.ShmemEnabled + ")"
		}
		msg += ", so memfd-backed guests (needed for vhost-user) are populated and mapped 4 KiB at a time"
		if c := p.PopulateCost; c != nil && c.AnonTHP > 0 {
			msg += fmt.Sprintf(": populating %s took %s anonymous with THP (%.1f GiB/s) and %s as a memfd "+
				"(%.1f GiB/s), %.1fx longer", units.Human(c.Size), units.FormatDuration(c.AnonTHP), units.GiBPerSec(c.Size, c.AnonTHP),
				units.FormatDuration(c.Memfd), units.GiBPerSec(c.Size, c.Memfd), c.Ratio())
		}
		a = append(a, msg+". Set shmem_enabled to advise (echo advise > "+
			"/sys/kernel/mm/transparent_hugepage/shmem_enabled; guestmem asks MADV_HUGEPAGE on every region), "+
			"use a hugetlb backing, or use anonymous memory when no other process maps guest RAM.")
	default:
		if c := p.PopulateCost; c != nil && c.MemfdHuge < 0.5 {
			a = append(a, fmt.Sprintf("Shmem hugepages are enabled (%s) but only %.0f%% of the measured memfd was "+
				"mapped huge: memory may be fragmented.", p.THP.ShmemEnabled, 100*c.MemfdHuge))
		}
	}
	if c := p.PopulateCost; c != nil && p.THP.Enabled != "never" && p.THP.Enabled != "" && c.AnonHuge < 0.5 {
		a = append(a, fmt.Sprintf("Only %.0f%% of the anonymous memory asked to use THP got huge pages: memory may "+
			"be fragmented (see /proc/buddyinfo), or THP is restricted.", 100*c.AnonHuge))
	}
	anyPool := false
	for _, pool := range p.HugePools {
		anyPool = anyPool || pool.Total > 0
	}
	if !anyPool {
		a = append(a, "No hugetlb pool: the hugetlb backing is unavailable (gmem bench skips it). Reserve one with "+
			"echo N > /proc/sys/vm/nr_hugepages (N 2 MiB pages), or hugepagesz=1G hugepages=N on the kernel command line.")
	}
	if p.Memlock.Error == "" && p.Memlock.Soft >= 0 && uint64(p.Memlock.Soft) < p.Memory.Total/2 {
		limit := units.Human(uint64(p.Memlock.Soft))
		if p.Memlock.CapIPCLock {
			a = append(a, fmt.Sprintf("RLIMIT_MEMLOCK is %s, but this process has CAP_IPC_LOCK, which exempts it. A VMM "+
				"run without CAP_IPC_LOCK could lock only %s of guest RAM (LockOnFault).", limit, limit))
		} else {
			a = append(a, fmt.Sprintf("RLIMIT_MEMLOCK is %s: LockOnFault can keep at most %s of guest RAM out of swap. "+
				"Raise it (ulimit -l unlimited, or LimitMEMLOCK=infinity in a systemd unit) or grant CAP_IPC_LOCK.",
				limit, limit))
		}
	}
	if p.Overcommit.Mode == 2 {
		a = append(a, fmt.Sprintf("overcommit_memory=2 (strict): MAP_NORESERVE is ignored and all guest RAM counts "+
			"against CommitLimit (%s, %s committed): a guest larger than what remains cannot be created.",
			units.Human(p.Memory.CommitLimit), units.Human(p.Memory.Committed)))
	}
	if !p.PopulateWrite.Works {
		a = append(a, "MADV_POPULATE_WRITE does not work here ("+p.PopulateWrite.Error+"): Prefault falls back to "+
			"touching every page, which is slower.")
	}
	if !p.MlockOnFault.Works {
		a = append(a, "mlock2(MLOCK_ONFAULT) does not work here ("+p.MlockOnFault.Error+"): LockOnFault will fail.")
	}
	return a
}

// renderProbe prints p as a table.
func renderProbe(w io.Writer, p *Probe) error {
	tw := &errWriter{w: w}
	section := func(name string) { fmt.Fprintf(tw, "%s\n", name) }
	row := func(k, format string, args ...any) { fmt.Fprintf(tw, "  %-23s %s\n", k, fmt.Sprintf(format, args...)) }
	yes := func(b bool) string {
		if b {
			return "yes"
		}
		return "no"
	}

	section("HOST")
	row("kernel", "%s", p.Kernel)
	row("memory", "%s available of %s", units.Human(p.Memory.Available), units.Human(p.Memory.Total))

	section("KVM")
	switch {
	case p.KVM.Usable:
		row(p.KVM.Path, "present, read-write, API version %d", p.KVM.APIVersion)
	case p.KVM.Present:
		row(p.KVM.Path, "present, not usable: %s", p.KVM.Error)
	default:
		row(p.KVM.Path, "absent")
	}
	if c := p.KVM.Caps; c != nil {
		row("memory slots", "%d", c.Memslots)
		row("read-only slots", "%s", yes(c.ReadonlyMem))
		row("user memory2", "%s", yes(c.UserMemory2))
		row("guest_memfd", "%s", yes(c.GuestMemfd))
		row("manual dirty log", "%s", yes(c.ManualDirtyLog))
		if c.DirtyRingBytes > 0 {
			row("dirty ring", "yes, up to %s", units.Human(uint64(c.DirtyRingBytes)))
		} else {
			row("dirty ring", "no")
		}
		row("vCPUs (recommended)", "%d", c.VCPUs)
	} else if p.KVM.Usable && p.KVM.Error != "" {
		row("capabilities", "unreadable: %s", p.KVM.Error)
	}

	section("TRANSPARENT HUGEPAGES")
	orAbsent := func(s string) string {
		if s == "" {
			return "(absent)"
		}
		return s
	}
	row("enabled", "%s", orAbsent(p.THP.Enabled))
	row("defrag", "%s", orAbsent(p.THP.Defrag))
	row("shmem_enabled", "%s", orAbsent(p.THP.ShmemEnabled))

	section("HUGETLB POOLS")
	if len(p.HugePools) == 0 {
		row("(none)", "")
	}
	for _, pool := range p.HugePools {
		row(Size(pool.PageSize).String()+" pages", "%d free of %d", pool.Free, pool.Total)
	}

	section("LIMITS")
	if p.Memlock.Error != "" {
		row("RLIMIT_MEMLOCK", "unknown: %s", p.Memlock.Error)
	} else {
		lim := func(v int64) string {
			if v < 0 {
				return "unlimited"
			}
			return units.Human(uint64(v))
		}
		exempt := ""
		if p.Memlock.CapIPCLock {
			exempt = " (not enforced: CAP_IPC_LOCK)"
		}
		row("RLIMIT_MEMLOCK", "%s soft, %s hard%s", lim(p.Memlock.Soft), lim(p.Memlock.Hard), exempt)
	}
	row("overcommit_memory", "%d (%s)", p.Overcommit.Mode, p.Overcommit.Meaning)

	section("SYSCALLS")
	works := func(c Check) string {
		if c.Works {
			return "works"
		}
		return "fails: " + c.Error
	}
	row("MADV_POPULATE_WRITE", "%s", works(p.PopulateWrite))
	row("mlock2(MLOCK_ONFAULT)", "%s", works(p.MlockOnFault))

	if c := p.PopulateCost; c != nil {
		section("POPULATE COST (" + units.Human(c.Size) + ", " + c.Method + ")")
		row("anonymous + THP", "%s (%.1f GiB/s, %.0f%% huge)", units.FormatDuration(c.AnonTHP), units.GiBPerSec(c.Size, c.AnonTHP),
			100*c.AnonHuge)
		row("memfd", "%s (%.1f GiB/s, %.0f%% huge)", units.FormatDuration(c.Memfd), units.GiBPerSec(c.Size, c.Memfd), 100*c.MemfdHuge)
		row("memfd / anonymous", "%.1fx", c.Ratio())
	}
	section("ADVICE")
	if len(p.Advice) == 0 {
		fmt.Fprintln(tw, "  nothing to change")
	}
	for _, s := range p.Advice {
		fmt.Fprintf(tw, "  - %s\n", s)
	}
	return tw.err
}

// errWriter remembers the first write error, so a renderer can write
// freely and check once.
type errWriter struct {
	w   io.Writer
	err error
}

// Write writes p unless an earlier write failed.
func (e *errWriter) Write(p []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	n, err := e.w.Write(p)
	e.err = err
	return n, err
}
