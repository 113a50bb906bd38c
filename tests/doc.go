//go:build amd64

// Package tests holds the integration tests that cross packages and need a
// real kernel: guest code run on /dev/kvm through internal/guest, against
// memory from arena and guestmem. kvm_test.go covers the kvm package and
// the harness (docs/kvm.md lists what each test shows). The KVM tests skip
// without a usable /dev/kvm, and fail instead under GMEM_REQUIRE_KVM=1.
package tests
