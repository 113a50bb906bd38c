//go:build amd64 || arm64

package reentry

// getg returns the address of the calling goroutine's runtime g: unique
// among live goroutines, and only compared, never dereferenced.
func getg() uintptr

// goroutine identifies the calling goroutine.
func goroutine() uintptr { return getg() }
