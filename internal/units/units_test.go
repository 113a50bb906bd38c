package units

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Size
	}{
		{"0", 0},
		{"4096", 4096},
		{"4096B", 4096},
		{"512M", 512 * MiB},
		{"512m", 512 * MiB},
		{"4G", 4 * GiB},
		{"4GiB", 4 * GiB},
		{"4gib", 4 * GiB},
		{" 4 GiB ", 4 * GiB},
		{"1T", TiB},
		{"1TiB", TiB},
		{"64K", 64 * KiB},
		{"64KiB", 64 * KiB},
		{"1P", 1 << 50},
		{"15E", 15 << 60},
		{"1.5G", 1536 * MiB},
		{"0.5K", 512},
		{".5M", 512 * KiB},
		{"2.", 2},
		{"18446744073709551615", 1<<64 - 1},
	} {
		got, err := ParseSize(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
}

func TestParseSizeRejects(t *testing.T) {
	for _, tc := range []struct {
		in, why string
	}{
		{"", "empty"},
		{"G", "does not start with a number"},
		{"-1G", "does not start with a number"},
		{"4X", "unknown unit"},
		{"4GB", "write G or GiB"},
		{"4gb", "write G or GiB"},
		{"4Gi", "unknown unit"},
		{"4 G B", "unknown unit"},
		{"1.2.3G", "not a number"},
		{".", "not a number"},
		{"0.3", "not a whole number of bytes"},
		{"1.1K", "not a whole number of bytes"},
		{"16E", "too large"},
		{"18446744073709551616", "too large"},
		{"99999999999999999999T", "too large"},
		{"15.99999E", "not a whole number"},
	} {
		_, err := ParseSize(tc.in)
		if err == nil {
			t.Errorf("ParseSize(%q) succeeded; want an error (%s)", tc.in, tc.why)
			continue
		}
		if !errors.Is(err, ErrBadSize) || !strings.Contains(err.Error(), tc.why) {
			t.Errorf("ParseSize(%q) = %v; want ErrBadSize saying %q", tc.in, err, tc.why)
		}
	}
}

func TestSizeStringRoundTrips(t *testing.T) {
	for _, s := range []Size{1, 4095, 4096, 512 * MiB, 1536 * MiB, 4 * GiB, TiB, 3 * TiB, 1 << 60} {
		got, err := ParseSize(s.String())
		if err != nil || got != s {
			t.Errorf("ParseSize(%v.String() = %q) = %d, %v", uint64(s), s.String(), got, err)
		}
	}
	if got := (4 * GiB).String(); got != "4GiB" {
		t.Errorf("String = %q, want 4GiB", got)
	}
	if got := (1536 * MiB).String(); got != "1536MiB" {
		t.Errorf("String = %q, want 1536MiB", got)
	}
}

func TestSizeUnmarshalText(t *testing.T) {
	var s Size
	if err := s.UnmarshalText([]byte("2G")); err != nil || s != 2*GiB {
		t.Fatalf("UnmarshalText(2G) = %v, %v", s, err)
	}
	if err := s.UnmarshalText([]byte("2 gigs")); err == nil {
		t.Fatal("UnmarshalText accepted 2 gigs")
	}
	if s != 2*GiB {
		t.Fatal("a failed UnmarshalText changed the value")
	}
}

func TestHuman(t *testing.T) {
	for n, want := range map[uint64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536 << 20: "1.5 GiB",
		24 << 30: "24.0 GiB"} {
		if got := Human(n); got != want {
			t.Errorf("Human(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestFormatDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{0: "0", -1: "0", 500: "500ns", 1500: "1.50µs",
		41300 * time.Microsecond: "41.3ms", 812 * time.Microsecond: "812µs", 2050 * time.Millisecond: "2.05s",
		150 * time.Second: "150s"} {
		if got := FormatDuration(d); got != want {
			t.Errorf("FormatDuration(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestGiBPerSec(t *testing.T) {
	if got := GiBPerSec(uint64(4*GiB), 2*time.Second); got != 2 {
		t.Errorf("GiBPerSec(4 GiB, 2s) = %v", got)
	}
	if got := GiBPerSec(uint64(GiB), 0); got != 0 {
		t.Errorf("GiBPerSec(_, 0) = %v", got)
	}
}
