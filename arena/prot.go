package arena

import (
	"strings"

	"golang.org/x/sys/unix"
)

// Protection is the access a mapping allows, as the PROT_* bits of mmap(2).
type Protection int

// Protection values; combine with |.
const (
	ProtNone  Protection = unix.PROT_NONE
	ProtRead  Protection = unix.PROT_READ
	ProtWrite Protection = unix.PROT_WRITE
	ProtExec  Protection = unix.PROT_EXEC

	// ProtReadWrite is the usual protection of guest RAM.
	ProtReadWrite = ProtRead | ProtWrite
)

const protMask = ProtRead | ProtWrite | ProtExec

func (p Protection) valid() bool { return p&^protMask == 0 }

// String returns the protection in /proc/self/maps notation, e.g. "rw-".
func (p Protection) String() string {
	if !p.valid() {
		return "invalid"
	}
	var b strings.Builder
	for _, c := range []struct {
		bit Protection
		ch  byte
	}{{ProtRead, 'r'}, {ProtWrite, 'w'}, {ProtExec, 'x'}} {
		if p&c.bit != 0 {
			b.WriteByte(c.ch)
		} else {
			b.WriteByte('-')
		}
	}
	return b.String()
}
