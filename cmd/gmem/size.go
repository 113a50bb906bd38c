//go:build amd64

package main

import "github.com/gmem-vmm/gmem/internal/units"

// Size is a byte count on the command line: 512M, 4G, 4GiB, 1.5G, 65536.
// Units are binary and "GB" is refused rather than guessed (units.ParseSize).
type Size = units.Size

// Common sizes.
const (
	KiB = units.KiB
	MiB = units.MiB
	GiB = units.GiB
	TiB = units.TiB
)
