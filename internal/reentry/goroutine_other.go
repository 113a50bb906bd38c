//go:build !amd64 && !arm64

package reentry

import (
	"bytes"
	"runtime"
	"strconv"
)

// goroutine identifies the calling goroutine by its ID, read from the head
// of its stack trace ("goroutine 18 [running]:"): slower than the g pointer
// the assembly reads on amd64 and arm64, and only used where Check finds
// some goroutine inside an Enter.
func goroutine() uintptr {
	var buf [64]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b = bytes.TrimPrefix(b, []byte("goroutine "))
	if i := bytes.IndexByte(b, ' '); i > 0 {
		b = b[:i]
	}
	id, _ := strconv.ParseUint(string(b), 10, 64)
	return uintptr(id)
}
