// Package host reports what a Linux host offers guest memory, from a VMM's
// point of view, before any guest RAM is allocated: the transparent
// hugepage modes, the hugetlb pools, RLIMIT_MEMLOCK, the overcommit policy
// and commit limit, whether MADV_POPULATE_WRITE and mlock2(MLOCK_ONFAULT)
// work, what the KVM device offers, the NUMA nodes, and advice drawn from
// all of it (say, that memfd-backed guests get 4 KiB pages because
// shmem_enabled is never, with the measured cost).
//
// A VMM calls Probe once at start-up, before guestmem.New, to choose a
// backing and to log what would make guests cheaper; `gmem probe` prints
// the same Facts. The cheap readers (ReadMemInfo, ReadTHP, ReadHugePools)
// serve a check before an allocation, such as whether a hugetlb pool holds
// a guest (HugePools.Check).
//
// Files come from an fs.FS rooted at the host's "/" (os.DirFS("/") by
// default; a fstest.MapFS in tests), so that /proc and /sys can be faked.
// The system calls (uname, getrlimit, the trial mappings, opening KVM)
// always ask the running kernel.
package host
