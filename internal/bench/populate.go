//go:build amd64

package bench

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"sync"

	"github.com/gmem-vmm/gmem/arena"
	"github.com/gmem-vmm/gmem/guestmem"
	"github.com/gmem-vmm/gmem/internal/fault"
	"github.com/gmem-vmm/gmem/kvm"
	"golang.org/x/sys/unix"
)

// BackingChoice is one of the backings the bench measures (a --backings
// name): a guestmem backing, with or without transparent hugepages, or
// hugetlb with its page size.
type BackingChoice struct {
	Name     string           // flag value and table label: anon, anon-thp, memfd, hugetlb, gmem
	Backing  guestmem.Backing // what guestmem.New is asked for
	THP      bool             // transparent hugepages requested (MADV_HUGEPAGE)
	HugePage uint64           // hugetlb page size; 0 for other backings
}

// The names of the backing choices, which the --backings flag accepts.
const (
	BackingAnon    = "anon"
	BackingAnonTHP = "anon-thp"
	BackingMemfd   = "memfd"
	BackingHugetlb = "hugetlb"
	BackingGmem    = "gmem" // guest_memfd made on the VM (guestmem.WithGuestMemfd); needs KVM and Linux 6.18
)

// BackingNames are the backing choices, in the order they are measured.
var BackingNames = []string{BackingAnon, BackingAnonTHP, BackingMemfd, BackingHugetlb, BackingGmem}

// backingByName returns the backing called name; hugePage is the hugetlb
// page size.
func backingByName(name string, hugePage uint64) (BackingChoice, error) {
	switch name {
	case BackingAnon:
		return BackingChoice{Name: name, Backing: guestmem.Anonymous}, nil
	case BackingAnonTHP:
		return BackingChoice{Name: name, Backing: guestmem.Anonymous, THP: true}, nil
	case BackingMemfd:
		return BackingChoice{Name: name, Backing: guestmem.Memfd, THP: true}, nil
	case BackingHugetlb:
		return BackingChoice{Name: name, Backing: guestmem.Hugetlb, HugePage: hugePage}, nil
	case BackingGmem:
		return BackingChoice{Name: name, Backing: guestmem.GuestMemfd}, nil
	}
	return BackingChoice{}, fmt.Errorf("unknown backing %q (want one of %v)", name, BackingNames)
}

// guestmemOptions are the guestmem.New options for b; vm is the VM a
// guest_memfd is made on.
func (b BackingChoice) guestmemOptions(vm *kvm.VM) []guestmem.Option {
	opts := []guestmem.Option{guestmem.WithName("gmem-bench")}
	switch b.Backing {
	case guestmem.GuestMemfd:
		opts = append(opts, guestmem.WithGuestMemfd(vm))
	case guestmem.Memfd:
		opts = append(opts, guestmem.WithMemfd())
	case guestmem.Hugetlb:
		opts = append(opts, guestmem.WithHugetlb(b.HugePage))
	}
	if !b.THP {
		opts = append(opts, guestmem.WithoutHugepages())
	}
	return opts
}

// granule is the page size of the backing: the unit work is split in.
func (b BackingChoice) granule() uint64 {
	if b.HugePage != 0 {
		return b.HugePage
	}
	return 2 << 20 // a transparent hugepage is never split between workers
}

// plainMapping is memory of one backing mapped directly, not through
// guestmem: the baseline the peers and the MAP_POPULATE strategy use.
type plainMapping struct {
	m *arena.Mapping
	b []byte // the whole mapping; valid until close
}

// mapPlain maps size bytes of backing b: private anonymous memory
// (MAP_NORESERVE, 2 MiB aligned) or a shared mapping of a fresh memfd or
// hugetlb memfd. With populate the mmap carries MAP_POPULATE. MADV_HUGEPAGE
// is applied after the mmap when b asks for THP, so a populating mmap gets
// it too late, as it would in any program.
func mapPlain(size uint64, b BackingChoice, populate bool) (*plainMapping, error) {
	var opts []arena.Option
	if populate {
		opts = append(opts, arena.PopulateOnMap())
	}
	var m *arena.Mapping
	var err error
	switch b.Backing {
	case guestmem.Anonymous:
		opts = append(opts, arena.Private(), arena.NoReserve(), arena.Align(2<<20))
		m, err = arena.NewAnon(int64(size), opts...)
	case guestmem.Memfd, guestmem.Hugetlb:
		flags := unix.MFD_CLOEXEC
		align := uint64(2 << 20)
		if b.Backing == guestmem.Hugetlb {
			flags |= unix.MFD_HUGETLB | bits.TrailingZeros64(b.HugePage)<<unix.MFD_HUGE_SHIFT
			align = max(align, b.HugePage)
		}
		fd, ferr := unix.MemfdCreate("gmem-bench", flags)
		if ferr != nil {
			return nil, fmt.Errorf("memfd_create: %w", ferr)
		}
		if ferr = unix.Ftruncate(fd, int64(size)); ferr != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("ftruncate memfd to %d: %w", size, ferr)
		}
		opts = append(opts, arena.Align(int64(align)))
		m, err = arena.NewFromFD(fd, 0, int64(size), opts...)
		unix.Close(fd) // the mapping holds its own reference
	default:
		return nil, fmt.Errorf("backing %v cannot be mapped directly", b.Backing)
	}
	if err != nil {
		return nil, err
	}
	if b.THP {
		// Shmem accepts the advice too; whether it has an effect depends on
		// shmem_enabled.
		if err := m.UseHugepages(0, int64(size)); err != nil {
			m.Close()
			return nil, err
		}
	}
	bs, err := m.Bytes(0, int64(size))
	if err != nil {
		m.Close()
		return nil, err
	}
	return &plainMapping{m: m, b: bs}, nil
}

func (p *plainMapping) close() error {
	p.b = nil
	return p.m.Close()
}

// hugeFraction returns the fraction of the mapping's bytes that the kernel
// maps with huge pages (THP, shmem PMD or hugetlb), and the resident
// fraction, from /proc/self/smaps.
func (p *plainMapping) hugeFraction() (huge, resident float64) {
	st, err := p.m.Stats()
	if err != nil || p.m.Size() == 0 {
		return 0, 0
	}
	size := float64(p.m.Size())
	h := st.AnonHugePages + st.ShmemPmdMapped + st.FilePmdMapped + st.Hugetlb
	return float64(h) / size, float64(st.Rss+st.Hugetlb) / size
}

// splitRange cuts [0, n) into at most parts contiguous pieces whose
// boundaries are multiples of granule.
func splitRange(n, granule uint64, parts int) [][2]uint64 {
	if parts < 1 {
		parts = 1
	}
	units := (n + granule - 1) / granule
	per := (units + uint64(parts) - 1) / uint64(parts)
	var out [][2]uint64
	for lo := uint64(0); lo < n; lo += per * granule {
		out = append(out, [2]uint64{lo, min(n, lo+per*granule)})
	}
	return out
}

// populateDirect populates b with madvise(MADV_POPULATE_WRITE) from workers
// goroutines, each on one contiguous share of the range.
func populateDirect(b []byte, granule uint64, workers int) error {
	return eachShare(b, granule, workers, func(share []byte) error {
		if err := unix.Madvise(share, unix.MADV_POPULATE_WRITE); err != nil {
			return fmt.Errorf("madvise(MADV_POPULATE_WRITE): %w", err)
		}
		return nil
	})
}

// eachShare runs fn on workers contiguous shares of b, split at multiples
// of granule, one goroutine each, and joins their errors.
func eachShare(b []byte, granule uint64, workers int, fn func([]byte) error) error {
	parts := splitRange(uint64(len(b)), granule, workers)
	errs := make([]error, len(parts))
	var wg sync.WaitGroup
	for i, r := range parts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = fn(b[r[0]:r[1]])
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// touchFault names a memory fault (a *fault.Error) that a touch of guest
// RAM caught; other errors pass unchanged.
func touchFault(err error) error {
	var fe *fault.Error
	if errors.As(err, &fe) {
		return fmt.Errorf("touching guest RAM: %w", err)
	}
	return err
}

// touchChunk is how many bytes the touch loops do between checks of ctx.
const touchChunk = 64 << 20

// touchPages writes one byte in every 4 KiB page of b from this goroutine,
// as a VMM that populates by touching does. A memory fault is an error, not
// a crash.
func touchPages(ctx context.Context, b []byte) error {
	return touchFault(fault.Do(func() error {
		for lo := 0; lo < len(b); lo += touchChunk {
			if err := ctx.Err(); err != nil {
				return err
			}
			hi := min(len(b), lo+touchChunk)
			for i := lo; i < hi; i += 4096 {
				b[i] = 1
			}
		}
		return nil
	}))
}

// memset clears b with workers goroutines, each on one contiguous share.
func memset(ctx context.Context, b []byte, workers int) error {
	return eachShare(b, 2<<20, workers, func(share []byte) error { return clearChunks(ctx, share) })
}

func clearChunks(ctx context.Context, b []byte) error {
	return touchFault(fault.Do(func() error {
		for lo := 0; lo < len(b); lo += touchChunk {
			if err := ctx.Err(); err != nil {
				return err
			}
			clear(b[lo:min(len(b), lo+touchChunk)])
		}
		return nil
	}))
}
