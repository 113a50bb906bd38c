package host

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"time"
)

// Facts is what Probe found out about a host. A fact that could not be
// read is left zero or says why in its Error field; Advice says what of it
// costs guests something and what would change it.
type Facts struct {
	Kernel        string        `json:"kernel"` // uname: system, release, machine
	Memory        MemInfo       `json:"memory"`
	KVM           KVM           `json:"kvm"`
	THP           THPModes      `json:"transparent_hugepages"`
	HugePools     HugePools     `json:"hugepage_pools"`
	NUMA          []NUMANode    `json:"numa_nodes"`
	KSM           KSM           `json:"ksm"`
	Memlock       Memlock       `json:"memlock"`
	Overcommit    Overcommit    `json:"overcommit"`
	PopulateWrite Check         `json:"madv_populate_write"` // what guestmem's Prefault uses
	MlockOnFault  Check         `json:"mlock2_onfault"`      // what guestmem's LockOnFault uses
	PopulateCost  *PopulateCost `json:"populate_cost,omitempty"`
	Advice        []Advice      `json:"advice"`
}

// Memlock is RLIMIT_MEMLOCK, which bounds how much guest RAM LockOnFault
// can keep out of swap; -1 is unlimited.
type Memlock struct {
	Soft       int64  `json:"soft_bytes"`
	Hard       int64  `json:"hard_bytes"`
	CapIPCLock bool   `json:"cap_ipc_lock"` // the process is exempt from the limit
	Error      string `json:"error,omitempty"`
}

// Check is the outcome of trying a system call on a small mapping.
type Check struct {
	Works bool   `json:"works"`
	Error string `json:"error,omitempty"`
}

func check(err error) Check {
	if err != nil {
		return Check{Error: err.Error()}
	}
	return Check{Works: true}
}

// PopulateCost is the measured cost of populating the same number of bytes
// of anonymous memory with transparent hugepages and of a memfd, from one
// thread: on most hosts the two differ by the page size shmem gets.
type PopulateCost struct {
	Size      uint64        `json:"size_bytes"`
	AnonTHP   time.Duration `json:"anon_thp_ns"`
	Memfd     time.Duration `json:"memfd_ns"`
	AnonHuge  float64       `json:"anon_thp_huge_fraction"` // of Size mapped with huge pages
	MemfdHuge float64       `json:"memfd_huge_fraction"`
	Method    string        `json:"method"`
}

// Ratio is how many times longer the memfd took; 0 without a figure for
// anonymous memory.
func (c *PopulateCost) Ratio() float64 {
	if c.AnonTHP <= 0 {
		return 0
	}
	return float64(c.Memfd) / float64(c.AnonTHP)
}

// Options say where Probe looks and what it measures.
type Options struct {
	// Root is the host's root directory, for /proc and /sys; nil is
	// os.DirFS("/").
	Root fs.FS
	// KVMPath is the KVM device; "" is kvm.DefaultPath.
	KVMPath string
	// MeasureSize, when not zero, has Probe time populating this many bytes
	// of anonymous memory with transparent hugepages and of a memfd
	// (PopulateCost, which the advice quotes). It must be a multiple of
	// 2 MiB; each mapping is made and freed four times, one at a time, so
	// it must fit in MemAvailable.
	MeasureSize uint64
}

// Probe finds out what the host offers guest memory. It allocates nothing
// that outlives it: the trial mappings are a few pages, and the
// MeasureSize mappings are freed before it returns. Reading a fact that
// fails leaves it zero, or records why, and does not fail Probe. The error
// is for Options that cannot be used, or ctx's error when ctx was done
// before the probe finished: the Facts are then those found so far.
func Probe(ctx context.Context, opts Options) (*Facts, error) {
	if opts.MeasureSize%(2<<20) != 0 {
		return nil, fmt.Errorf("host: MeasureSize %d is not a multiple of 2 MiB", opts.MeasureSize)
	}
	f := probe(ctx, thisHost(opts))
	return f, ctx.Err()
}

// prober is where probe gets each fact, so that tests can substitute a
// host.
type prober struct {
	root          fs.FS
	uname         func() (string, error)
	kvm           func() KVM
	memlock       func() (soft, hard int64, err error)
	populateWrite func() error
	mlockOnFault  func() error
	// measure times the populate of anonymous+THP and memfd memory; nil
	// skips it.
	measure func(ctx context.Context) (*PopulateCost, error)
}

// thisHost is the prober of the running kernel, with opts' files.
func thisHost(opts Options) prober {
	root := opts.Root
	if root == nil {
		root = os.DirFS("/")
	}
	p := prober{
		root:          root,
		uname:         Kernel,
		kvm:           func() KVM { return probeKVM(opts.KVMPath) },
		memlock:       memlockLimit,
		populateWrite: tryPopulateWrite,
		mlockOnFault:  tryMlockOnFault,
	}
	if size := opts.MeasureSize; size > 0 {
		p.measure = func(ctx context.Context) (*PopulateCost, error) { return measurePopulate(ctx, size) }
	}
	return p
}

// probe fills Facts from p.
func probe(ctx context.Context, p prober) *Facts {
	f := &Facts{}
	if k, err := p.uname(); err == nil {
		f.Kernel = k
	} else {
		f.Kernel = "unknown: " + err.Error()
	}
	f.Memory, _ = ReadMemInfo(p.root)
	f.KVM = p.kvm()
	f.THP = ReadTHP(p.root)
	f.HugePools = ReadHugePools(p.root)
	f.NUMA = readNUMA(p.root)
	f.KSM = readKSM(p.root)
	f.Memlock.CapIPCLock = hasCapIPCLock(p.root)
	if soft, hard, err := p.memlock(); err != nil {
		f.Memlock.Error = err.Error()
	} else {
		f.Memlock.Soft, f.Memlock.Hard = soft, hard
	}
	f.Overcommit = readOvercommit(p.root)
	f.PopulateWrite = check(p.populateWrite())
	f.MlockOnFault = check(p.mlockOnFault())
	var failed []Advice
	if p.measure != nil && ctx.Err() == nil {
		if c, err := p.measure(ctx); err == nil {
			f.PopulateCost = c
		} else if ctx.Err() == nil {
			failed = append(failed, Advice{Topic: TopicMeasure,
				Text: "Timing the populate of anonymous and memfd memory failed: " + err.Error()})
		}
	}
	f.Advice = append(Advise(f), failed...)
	return f
}
