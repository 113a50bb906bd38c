// Package units parses and formats the quantities gmem reads and prints:
// sizes in binary units (512M, 4GiB), approximate byte counts (23.1 GiB),
// durations to three significant digits (41.3ms) and rates in GiB/s. The
// command, the host package and the benchmark harness share it, so that a
// size or a duration reads the same wherever it is printed.
package units

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"strconv"
	"strings"
	"time"
)

// Size is a number of bytes, given on the command line as 512M, 4G, 4GiB, 1T,
// 1.5G or 65536. Units are binary (K = 1024), as in QEMU's -m; "GB" and the
// like are refused rather than guessed.
type Size uint64

// Common sizes.
const (
	KiB Size = 1 << 10
	MiB Size = 1 << 20
	GiB Size = 1 << 30
	TiB Size = 1 << 40
)

// ErrBadSize is wrapped by every error ParseSize returns.
var ErrBadSize = errors.New("malformed size")

var unitShift = map[byte]uint{'b': 0, 'k': 10, 'm': 20, 'g': 30, 't': 40, 'p': 50, 'e': 60}

// ParseSize parses s: a decimal number, optionally with a fraction, followed
// by an optional unit B, K, M, G, T, P or E, optionally followed by "iB"
// (case-insensitive). The result must be a whole number of bytes that fits in
// 64 bits.
func ParseSize(s string) (Size, error) {
	in := s
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, fmt.Errorf("%w: empty", ErrBadSize)
	}
	i := 0
	for i < len(s) && (s[i] >= '0' && s[i] <= '9' || s[i] == '.') {
		i++
	}
	num, unit := s[:i], strings.ToLower(strings.TrimSpace(s[i:]))
	if num == "" {
		return 0, fmt.Errorf("%w: %q does not start with a number", ErrBadSize, in)
	}
	shift := uint(0)
	switch {
	case unit == "":
	case len(unit) == 1 && unitShift[unit[0]] > 0 || unit == "b":
		shift = unitShift[unit[0]]
	case len(unit) == 3 && unit[1:] == "ib" && unitShift[unit[0]] > 0:
		shift = unitShift[unit[0]]
	case len(unit) == 2 && unit[1] == 'b' && unitShift[unit[0]] > 0:
		return 0, fmt.Errorf("%w: %q: write %c or %ciB (units are binary: 1K = 1024)", ErrBadSize, in,
			upper(unit[0]), upper(unit[0]))
	default:
		return 0, fmt.Errorf("%w: %q: unknown unit %q (use K, M, G, T, optionally as KiB, MiB, GiB, TiB)",
			ErrBadSize, in, s[i:])
	}
	whole, frac, hasFrac := strings.Cut(num, ".")
	if whole == "" && frac == "" || strings.Contains(frac, ".") {
		return 0, fmt.Errorf("%w: %q is not a number", ErrBadSize, in)
	}
	var w uint64
	if whole != "" {
		var err error
		if w, err = strconv.ParseUint(whole, 10, 64); err != nil {
			return 0, fmt.Errorf("%w: %q is too large", ErrBadSize, in)
		}
	}
	if w > math.MaxUint64>>shift {
		return 0, fmt.Errorf("%w: %q is too large", ErrBadSize, in)
	}
	v := w << shift
	if hasFrac && frac != "" {
		// frac/10^len(frac) of 2^shift must be a whole number of bytes.
		if len(frac) > 18 {
			return 0, fmt.Errorf("%w: %q has too many decimals", ErrBadSize, in)
		}
		f, err := strconv.ParseUint(frac, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%w: %q is not a number", ErrBadSize, in)
		}
		den := uint64(1)
		for range len(frac) {
			den *= 10
		}
		hi, lo := bits.Mul64(f, uint64(1)<<shift)
		if hi >= den {
			return 0, fmt.Errorf("%w: %q is too large", ErrBadSize, in)
		}
		q, r := bits.Div64(hi, lo, den)
		if r != 0 {
			return 0, fmt.Errorf("%w: %q is not a whole number of bytes", ErrBadSize, in)
		}
		var c uint64
		if v, c = bits.Add64(v, q, 0); c != 0 {
			return 0, fmt.Errorf("%w: %q is too large", ErrBadSize, in)
		}
	}
	return Size(v), nil
}

func upper(b byte) byte { return b - 'a' + 'A' }

// UnmarshalText lets flags of type Size (and []Size) be parsed by kong.
func (s *Size) UnmarshalText(b []byte) error {
	v, err := ParseSize(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// String formats s exactly, in the largest binary unit that divides it:
// 4GiB, 1536MiB, 4096B.
func (s Size) String() string {
	if s == 0 {
		return "0B"
	}
	for _, u := range []struct {
		n    Size
		name string
	}{{1 << 60, "EiB"}, {1 << 50, "PiB"}, {TiB, "TiB"}, {GiB, "GiB"}, {MiB, "MiB"}, {KiB, "KiB"}} {
		if s%u.n == 0 {
			return strconv.FormatUint(uint64(s/u.n), 10) + u.name
		}
	}
	return strconv.FormatUint(uint64(s), 10) + "B"
}

// Human formats a byte count approximately, for messages: "23.1 GiB".
func Human(n uint64) string {
	v := float64(n)
	for _, u := range []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"} {
		if v < 1024 || u == "PiB" {
			if u == "B" {
				return fmt.Sprintf("%d B", n)
			}
			return fmt.Sprintf("%.1f %s", v, u)
		}
		v /= 1024
	}
	return ""
}

// FormatDuration formats d with three significant digits: 812µs, 41.3ms,
// 2.05s; 0 for a duration that is not positive.
func FormatDuration(d time.Duration) string {
	switch {
	case d <= 0:
		return "0"
	case d < time.Microsecond:
		return fmt.Sprintf("%dns", d.Nanoseconds())
	case d < time.Millisecond:
		return trim3(float64(d)/1e3) + "µs"
	case d < time.Second:
		return trim3(float64(d)/1e6) + "ms"
	}
	return trim3(d.Seconds()) + "s"
}

func trim3(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

// GiBPerSec returns bytes/d in GiB/s, or 0 when d is not positive.
func GiBPerSec(bytes uint64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(bytes) / float64(GiB) / d.Seconds()
}
