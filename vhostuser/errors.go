package vhostuser

import (
	"errors"
	"fmt"
)

// ErrNotShareable is returned by Export for guest memory another process
// cannot map: private anonymous memory (guestmem.Anonymous, and memory
// restored lazily, which is anonymous too) and a File backing, which
// guestmem maps privately, so the guest's writes never reach the file.
// Back guest RAM with guestmem.WithMemfd or WithHugetlb to share it.
var ErrNotShareable = errors.New("vhostuser: guest memory cannot be shared with another process")

// ErrTooManyRegions is returned when a memory table has more regions than
// the message or the back end takes: 8 for SET_MEM_TABLE, the back end's
// GET_MAX_MEM_SLOTS answer with CONFIGURE_MEM_SLOTS.
var ErrTooManyRegions = errors.New("vhostuser: too many memory regions")

// ErrNoRegion is returned by a back end's MemoryMap for a guest-physical
// range that no mapped region holds, and for REM_MEM_REG of a region the
// back end does not have.
var ErrNoRegion = errors.New("vhostuser: no mapped region holds the address")

// ErrNoLog is returned by MemoryMap.MarkDirty before SET_LOG_BASE gave a
// log, and for an address past its end.
var ErrNoLog = errors.New("vhostuser: no dirty log covers the address")

// ErrRejected is wrapped by the error for a request the back end answered
// with a non-zero status (REPLY_ACK); see RejectedError.
var ErrRejected = errors.New("vhostuser: the back end rejected the request")

// RejectedError is a non-zero REPLY_ACK status; it wraps ErrRejected.
type RejectedError struct {
	Request Request
	Status  uint64
}

func (e *RejectedError) Error() string {
	return fmt.Sprintf("vhostuser: the back end rejected %v with status %d", e.Request, e.Status)
}

// Unwrap returns ErrRejected.
func (e *RejectedError) Unwrap() error { return ErrRejected }
