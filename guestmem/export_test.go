package guestmem

// WithNodeRoot is withNodeRoot, for the external tests.
var WithNodeRoot = withNodeRoot

// SetGuestMemfdPrefault makes Prefault fill GuestMemfd memory with
// fallocate (true) or MADV_POPULATE_WRITE (false), for the benchmark and
// tests of both; it returns a function restoring the default.
func SetGuestMemfdPrefault(fallocate bool) (restore func()) {
	old := gmemPrefault
	gmemPrefault = gmemPopulate
	if fallocate {
		gmemPrefault = gmemFallocate
	}
	return func() { gmemPrefault = old }
}
