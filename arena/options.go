package arena

import "math/bits"

// Option configures a mapping made by NewAnon, NewFromFD, Arena.AddFDMapping
// or Arena.AddAnonMapping. Options that do not apply to a call (Align and
// WithProtection on Arena.Add*, Replace on the constructors) are rejected
// with ErrBadOption rather than ignored.
type Option func(*config)

type config struct {
	prot      Protection
	protSet   bool
	private   bool
	populate  bool
	align     int64
	hugetlb   int64 // hugetlb page size, 0 for none
	noReserve bool
	keepDump  bool
	replace   bool
}

// WithProtection sets the protection of a new Mapping (default ProtReadWrite).
// Arena.Add* take the protection as an argument instead.
func WithProtection(p Protection) Option {
	return func(c *config) { c.prot, c.protSet = p, true }
}

// Private makes the mapping MAP_PRIVATE: writes are copy-on-write and never
// reach the file or shared memory. The default is MAP_SHARED, as in crosvm,
// so the memory can be handed to another process through its fd.
func Private() Option { return func(c *config) { c.private = true } }

// PopulateOnMap asks mmap to prefault the whole mapping (MAP_POPULATE), as
// it maps. (Mapping.Populate prefaults a range later, with a choice of
// read or write faults and no failure hidden.)
func PopulateOnMap() Option { return func(c *config) { c.populate = true } }

// Align places a new Mapping at an address that is a multiple of align, a
// power of two of at least one page. The mapping is made inside an
// over-sized PROT_NONE reservation whose slack is unmapped afterwards.
func Align(align int64) Option { return func(c *config) { c.align = align } }

// Hugetlb backs an anonymous mapping with hugetlb pages of pageSize bytes
// (MAP_HUGETLB with the MAP_HUGE_* size bits). Sizes and offsets must then be
// multiples of pageSize, and the host needs a pool of such pages
// (/proc/sys/vm/nr_hugepages or /sys/kernel/mm/hugepages).
func Hugetlb(pageSize int64) Option { return func(c *config) { c.hugetlb = pageSize } }

// NoReserve maps without reserving swap space (MAP_NORESERVE).
func NoReserve() Option { return func(c *config) { c.noReserve = true } }

// KeepInCoreDumps leaves the memory in core dumps. By default every mapping is
// MADV_DONTDUMP, as in crosvm: guest RAM is large and private to the guest.
func KeepInCoreDumps() Option { return func(c *config) { c.keepDump = true } }

// Replace lets Arena.AddFDMapping and Arena.AddAnonMapping map over existing
// mappings in the range. Without it an overlap is ErrOverlap; crosvm always
// replaces, which makes a wrong offset silently destroy a live mapping.
func Replace() Option { return func(c *config) { c.replace = true } }

func buildConfig(opts []Option) config {
	c := config{prot: ProtReadWrite}
	for _, o := range opts {
		o(&c)
	}
	return c
}

// validAlign reports whether a is a power of two of at least one page.
func validAlign(a int64) bool {
	return a >= pageSize && bits.OnesCount64(uint64(a)) == 1
}

// hugeFlags returns the MAP_HUGETLB flags for a hugetlb page size.
func hugeFlags(size int64) int {
	const mapHugeShift = 26
	return 0x40000 /* MAP_HUGETLB */ | bits.TrailingZeros64(uint64(size))<<mapHugeShift
}
