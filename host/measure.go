package host

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/internal/fault"
)

// measurePopulate times populating size bytes of anonymous memory with
// MADV_HUGEPAGE and of a memfd: one untimed warm-up each, then the median
// of three, interleaved so that drifts in the host hit both alike.
func measurePopulate(ctx context.Context, size uint64) (*PopulateCost, error) {
	c := &PopulateCost{Size: size, Method: "madvise(MADV_POPULATE_WRITE), 1 thread, median of 3 after 1 warm-up"}
	if tryPopulateWrite() != nil {
		c.Method = "touching each 4 KiB page, 1 thread, median of 3 after 1 warm-up"
	}
	var ta, tm []time.Duration
	for i := range 4 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		d, huge, err := timePopulateOnce(ctx, size, false)
		if err != nil {
			return nil, fmt.Errorf("anonymous: %w", err)
		}
		if i > 0 {
			ta, c.AnonHuge = append(ta, d), huge
		}
		if d, huge, err = timePopulateOnce(ctx, size, true); err != nil {
			return nil, fmt.Errorf("memfd: %w", err)
		}
		if i > 0 {
			tm, c.MemfdHuge = append(tm, d), huge
		}
	}
	c.AnonTHP, c.Memfd = median(ta), median(tm)
	return c, nil
}

// timePopulateOnce maps size bytes of anonymous memory or of a memfd, both
// with MADV_HUGEPAGE, times populating them from one thread, and unmaps
// them. It returns the time and the share mapped with huge pages.
func timePopulateOnce(ctx context.Context, size uint64, memfd bool) (time.Duration, float64, error) {
	m, err := mapForMeasure(size, memfd)
	if err != nil {
		return 0, 0, err
	}
	defer m.Close()
	b, err := m.Bytes(0, int64(size))
	if err != nil {
		return 0, 0, err
	}
	t0 := time.Now()
	if err := unix.Madvise(b, unix.MADV_POPULATE_WRITE); err != nil {
		if !errors.Is(err, unix.EINVAL) {
			return 0, 0, fmt.Errorf("madvise(MADV_POPULATE_WRITE): %w", err)
		}
		t0 = time.Now()
		if err := touchPages(ctx, b); err != nil {
			return 0, 0, err
		}
	}
	d := time.Since(t0)
	return d, hugeFraction(m), nil
}

// mapForMeasure maps size bytes as guestmem would for its anonymous and
// memfd backings: private anonymous memory (MAP_NORESERVE) or a shared
// mapping of a fresh memfd, 2 MiB aligned, with MADV_HUGEPAGE.
func mapForMeasure(size uint64, memfd bool) (*arena.Mapping, error) {
	var m *arena.Mapping
	var err error
	if memfd {
		fd, ferr := unix.MemfdCreate("gmem-probe", unix.MFD_CLOEXEC)
		if ferr != nil {
			return nil, fmt.Errorf("memfd_create: %w", ferr)
		}
		if ferr = unix.Ftruncate(fd, int64(size)); ferr != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("ftruncate memfd to %d: %w", size, ferr)
		}
		m, err = arena.NewFromFD(fd, 0, int64(size), arena.Align(2<<20))
		unix.Close(fd) // the mapping holds its own reference
	} else {
		m, err = arena.NewAnon(int64(size), arena.Private(), arena.NoReserve(), arena.Align(2<<20))
	}
	if err != nil {
		return nil, err
	}
	// Shmem accepts the advice too; whether it has an effect depends on
	// shmem_enabled.
	if err := m.UseHugepages(0, int64(size)); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// hugeFraction returns the share of m's bytes that the kernel maps with
// huge pages (THP, shmem PMD or hugetlb), from /proc/self/smaps.
func hugeFraction(m *arena.Mapping) float64 {
	st, err := m.Stats()
	if err != nil || m.Size() == 0 {
		return 0
	}
	return float64(st.AnonHugePages+st.ShmemPmdMapped+st.FilePmdMapped+st.Hugetlb) / float64(m.Size())
}

// touchPages writes one byte in every 4 KiB page of b, as a VMM without
// MADV_POPULATE_WRITE populates. A memory fault is an error, not a crash.
func touchPages(ctx context.Context, b []byte) error {
	const chunk = 64 << 20 // bytes between checks of ctx
	err := fault.Do(func() error {
		for lo := 0; lo < len(b); lo += chunk {
			if err := ctx.Err(); err != nil {
				return err
			}
			for i := lo; i < min(len(b), lo+chunk); i += 4096 {
				b[i] = 1
			}
		}
		return nil
	})
	var fe *fault.Error
	if errors.As(err, &fe) {
		return fmt.Errorf("touching memory: %w", err)
	}
	return err
}

// median returns the median of d (the mean of the two middle values for
// an even count), or 0 for none.
func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return s[n/2-1] + (s[n/2]-s[n/2-1])/2
}
