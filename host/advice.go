package host

import (
	"fmt"

	"github.com/gmem-vmm/gmem/internal/units"
	"github.com/gmem-vmm/gmem/kvm"
)

// Advice is one thing about the host that costs guests something, and what
// would change it. In JSON it is its Text alone, so that a list of advice
// is a list of strings.
type Advice struct {
	Topic Topic  // what it is about, for a program to act on
	Text  string // for a person: what was found, what it costs, what to change
}

// String returns the Text.
func (a Advice) String() string { return a.Text }

// MarshalText encodes the Text.
func (a Advice) MarshalText() ([]byte, error) { return []byte(a.Text), nil }

// UnmarshalText decodes the Text; the Topic, which is not in it, is left
// empty.
func (a *Advice) UnmarshalText(b []byte) error {
	*a = Advice{Text: string(b)}
	return nil
}

// Topic names what a piece of Advice is about.
type Topic string

// The topics of advice.
const (
	TopicKVM            Topic = "kvm"             // no KVM device, or one this process cannot use
	TopicDirtyTracking  Topic = "dirty-tracking"  // neither manual dirty-log protection nor a dirty ring
	TopicTHP            Topic = "thp"             // transparent hugepages off, or absent
	TopicTHPDefrag      Topic = "thp-defrag"      // a fault in MADV_HUGEPAGE memory does not compact
	TopicShmemHugepages Topic = "shmem-hugepages" // memfd-backed guests get 4 KiB pages, or fewer huge pages than asked
	TopicFragmentation  Topic = "fragmentation"   // anonymous memory asked to use THP did not get it
	TopicHugetlbPool    Topic = "hugetlb-pool"    // no hugetlb pool
	TopicMemlock        Topic = "memlock"         // RLIMIT_MEMLOCK below half of RAM
	TopicOvercommit     Topic = "overcommit"      // strict overcommit: all guest RAM counts against CommitLimit
	TopicPopulateWrite  Topic = "populate-write"  // MADV_POPULATE_WRITE fails
	TopicMlockOnFault   Topic = "mlock-onfault"   // mlock2(MLOCK_ONFAULT) fails
	TopicMeasure        Topic = "measure"         // timing the populate failed
	TopicKSM            Topic = "ksm"             // no KSM in the kernel, or ksmd not running
	TopicKSMNUMA        Topic = "ksm-numa"        // ksmd merges across NUMA nodes on a host with several
	TopicGuestMemfd     Topic = "guest-memfd"     // guest_memfd the host can map, or why not
)

// Advise draws the advice from f's facts: what Probe puts in f.Advice,
// but for a note that the populate timing failed. It reads PopulateCost
// when f has one, to quote the measured cost.
func Advise(f *Facts) []Advice {
	var a []Advice
	add := func(t Topic, format string, args ...any) {
		a = append(a, Advice{Topic: t, Text: fmt.Sprintf(format, args...)})
	}
	switch {
	case !f.KVM.Present:
		add(TopicKVM, "No %s: guests cannot run here. %s.", f.KVM.Path,
			kvm.AccessAdvice(kvm.Node{Path: f.KVM.Path}, kvm.Caller{}))
	case !f.KVM.Usable:
		add(TopicKVM, "%s is present but not usable: %s", f.KVM.Path, f.KVM.Error)
	}
	if c := f.KVM.Caps; c != nil && !c.ManualDirtyLog && c.DirtyRingBytes == 0 {
		add(TopicDirtyTracking, "KVM has neither manual dirty-log protection nor a dirty ring: dirty tracking for "+
			"live migration write-protects all guest RAM at once when it starts.")
	}
	thpOn := f.THP.Enabled != "never" && f.THP.Enabled != ""
	switch f.THP.Enabled {
	case "never":
		add(TopicTHP, "Transparent hugepages are off (enabled=never): anonymous guests are populated and mapped "+
			"4 KiB at a time. echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (guestmem asks for them).")
	case "":
		add(TopicTHP, "This kernel has no transparent hugepages: use a hugetlb pool for large guests.")
	}
	if thpOn && (f.THP.Defrag == "never" || f.THP.Defrag == "defer") {
		add(TopicTHPDefrag, "THP defrag=%s: a fault in MADV_HUGEPAGE memory does not compact, so on a "+
			"fragmented host guests silently get 4 KiB pages. madvise or defer+madvise suits VMMs.", f.THP.Defrag)
	}
	c := f.PopulateCost
	switch f.THP.ShmemEnabled {
	case "never", "deny", "":
		msg := "Shmem hugepages are off"
		if f.THP.ShmemEnabled != "" {
			msg += " (shmem_enabled=" + f.THP.ShmemEnabled + ")"
		}
		msg += ", so memfd-backed guests (needed for vhost-user) are populated and mapped 4 KiB at a time"
		if c != nil && c.AnonTHP > 0 {
			msg += fmt.Sprintf(": populating %s took %s anonymous with THP (%.1f GiB/s) and %s as a memfd "+
				"(%.1f GiB/s), %.1fx longer", units.Human(c.Size), units.FormatDuration(c.AnonTHP),
				units.GiBPerSec(c.Size, c.AnonTHP), units.FormatDuration(c.Memfd), units.GiBPerSec(c.Size, c.Memfd),
				c.Ratio())
		}
		add(TopicShmemHugepages, "%s. Set shmem_enabled to advise (echo advise > "+
			"/sys/kernel/mm/transparent_hugepage/shmem_enabled; guestmem asks MADV_HUGEPAGE on every region), "+
			"use a hugetlb backing, or use anonymous memory when no other process maps guest RAM.", msg)
	default:
		if c != nil && c.MemfdHuge < 0.5 {
			add(TopicShmemHugepages, "Shmem hugepages are enabled (%s) but only %.0f%% of the measured memfd was "+
				"mapped huge: memory may be fragmented.", f.THP.ShmemEnabled, 100*c.MemfdHuge)
		}
	}
	if c != nil && thpOn && c.AnonHuge < 0.5 {
		add(TopicFragmentation, "Only %.0f%% of the anonymous memory asked to use THP got huge pages: memory may "+
			"be fragmented (see /proc/buddyinfo), or THP is restricted.", 100*c.AnonHuge)
	}
	anyPool := false
	for _, pool := range f.HugePools {
		anyPool = anyPool || pool.Total > 0
	}
	if !anyPool {
		add(TopicHugetlbPool, "No hugetlb pool: the hugetlb backing is unavailable. Reserve one with echo N > "+
			"/proc/sys/vm/nr_hugepages (N 2 MiB pages), or hugepagesz=1G hugepages=N on the kernel command line.")
	}
	if m := f.Memlock; m.Error == "" && m.Soft >= 0 && uint64(m.Soft) < f.Memory.Total/2 {
		limit := units.Human(uint64(m.Soft))
		if m.CapIPCLock {
			add(TopicMemlock, "RLIMIT_MEMLOCK is %s, but this process has CAP_IPC_LOCK, which exempts it. A VMM "+
				"run without CAP_IPC_LOCK could lock only %s of guest RAM (LockOnFault).", limit, limit)
		} else {
			add(TopicMemlock, "RLIMIT_MEMLOCK is %s: LockOnFault can keep at most %s of guest RAM out of swap. "+
				"Raise it (ulimit -l unlimited, or LimitMEMLOCK=infinity in a systemd unit) or grant CAP_IPC_LOCK.",
				limit, limit)
		}
	}
	if f.Overcommit.Mode == 2 {
		add(TopicOvercommit, "overcommit_memory=2 (strict): MAP_NORESERVE is ignored and all guest RAM counts "+
			"against CommitLimit (%s, %s committed): a guest larger than what remains cannot be created.",
			units.Human(f.Memory.CommitLimit), units.Human(f.Memory.Committed))
	}
	if !f.PopulateWrite.Works {
		add(TopicPopulateWrite, "MADV_POPULATE_WRITE does not work here (%s): Prefault falls back to touching "+
			"every page, which is slower.", f.PopulateWrite.Error)
	}
	switch k := f.KSM; {
	case !k.Available:
		add(TopicKSM, "This kernel has no KSM (no /sys/kernel/mm/ksm): guestmem's WithKSM and UseKSM fail here, "+
			"and identical guest pages are never merged.")
	case k.Run != 1:
		add(TopicKSM, "ksmd is not running (run=%d): guest RAM given WithKSM is marked mergeable but nothing is "+
			"merged. echo 1 > /sys/kernel/mm/ksm/run to merge; it costs CPU, set by pages_to_scan (%d) and "+
			"sleep_millisecs (%d).", k.Run, k.PagesToScan, k.SleepMillisecs)
	}
	if f.KSM.Available && f.KSM.MergeAcrossNodes == 1 && len(f.NUMA) > 1 {
		add(TopicKSMNUMA, "KSM merges across NUMA nodes (merge_across_nodes=1) on this %d-node host: identical "+
			"pages of guests bound to different nodes become one copy on one node, undoing WithNUMA. With "+
			"nothing merged (echo 2 > /sys/kernel/mm/ksm/run unmerges), echo 0 > "+
			"/sys/kernel/mm/ksm/merge_across_nodes.", len(f.NUMA))
	}
	if !f.MlockOnFault.Works {
		add(TopicMlockOnFault, "mlock2(MLOCK_ONFAULT) does not work here (%s): LockOnFault will fail.",
			f.MlockOnFault.Error)
	}
	if c := f.KVM.Caps; c != nil {
		switch {
		case c.GuestMemfdMmap:
			add(TopicGuestMemfd, "guest_memfd can be mapped by the host (flags %s): guestmem.WithGuestMemfd backs "+
				"guest RAM with memory KVM owns and maps for the guest from the file, sharable with a vhost-user "+
				"process. It has no dirty log, hugepages, KSM or userfaultfd, so keep memfd or anonymous memory for "+
				"guests that migrate live, snapshot incrementally, restore on demand or need hugepages.",
				c.GuestMemfdFlags)
		case c.GuestMemfd:
			add(TopicGuestMemfd, "guest_memfd is here but the host cannot map it (flags %s; mmap and init-shared "+
				"need Linux 6.18), so guestmem.WithGuestMemfd is refused; the other backings are unaffected.",
				c.GuestMemfdFlags)
		}
	}
	return a
}
