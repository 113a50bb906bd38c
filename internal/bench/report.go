//go:build amd64

package bench

import (
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"runtime"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/gmem-vmm/gmem/host"
	"github.com/gmem-vmm/gmem/internal/units"
)

// Report is everything one run of a Plan measured.
type Report struct {
	Command     string        `json:"command"`
	Started     time.Time     `json:"started"`
	Elapsed     time.Duration `json:"elapsed_ns"`
	Host        Host          `json:"host"`
	Runs        int           `json:"runs"`
	Warmup      int           `json:"warmup"`
	Workers     int           `json:"workers"`
	Results     []Result      `json:"results"`
	Notes       []string      `json:"notes"`
	Interrupted bool          `json:"interrupted"`
}

// Host describes the machine a report was measured on.
type Host struct {
	Kernel string        `json:"kernel"`
	CPUs   int           `json:"cpus"`
	Memory uint64        `json:"memory_bytes"`
	THP    host.THPModes `json:"transparent_hugepages"`
	QEMU   string        `json:"qemu,omitempty"`
	GoKVM  string        `json:"gokvm,omitempty"`
	// Load is /proc/loadavg's 1-minute load average when the run started
	// and when it ended: other work on the host skews the figures.
	LoadStart float64 `json:"load_start"`
	LoadEnd   float64 `json:"load_end"`
}

func readHost(root fs.FS) Host {
	h := Host{CPUs: runtime.NumCPU(), THP: host.ReadTHP(root)}
	h.Kernel, _ = host.Kernel()
	if mi, err := host.ReadMemInfo(root); err == nil {
		h.Memory = mi.Total
	}
	h.LoadStart = loadAverage(root)
	return h
}

// loadavgPath is the load average under the host's root.
const loadavgPath = "proc/loadavg"

// loadAverage returns the 1-minute load average, or 0 if unknown.
func loadAverage(root fs.FS) float64 {
	b, err := fs.ReadFile(root, loadavgPath)
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// busyNote says when the host was busy with other work during the run.
func busyNote(h Host) string {
	if h.CPUs == 0 || max(h.LoadStart, h.LoadEnd) < float64(h.CPUs)/2 {
		return ""
	}
	return fmt.Sprintf("the host was busy with other work (1-minute load average %.2f at the start, %.2f at the end, "+
		"on %d CPUs): the figures are noisier than on an idle host", h.LoadStart, h.LoadEnd, h.CPUs)
}

// Result is one figure: a gmem strategy or a peer, at one size and
// backing. A phase the method does not have is nil. For peers, Prefault
// is the one operation the peer times (a populate, QEMU's preallocation,
// gokvm's machine.New, a memset pass).
type Result struct {
	Size     uint64   `json:"size_bytes"`
	SizeText string   `json:"size"`
	Backing  string   `json:"backing"`
	Method   string   `json:"method"`
	Peer     bool     `json:"peer"`
	Workers  int      `json:"workers"`
	Map      *Summary `json:"map,omitempty"`      // guestmem.New: reserve the arena and map the backing
	Register *Summary `json:"register,omitempty"` // KVM slot registration of every region
	Prefault *Summary `json:"prefault,omitempty"` // populate
	Teardown *Summary `json:"teardown,omitempty"` // Close / munmap
	// GuestTouch is a vCPU writing one word in every page of guest RAM,
	// after the strategy: the first touch the guest itself pays.
	GuestTouch *Summary `json:"guest_touch,omitempty"`
	Setup      *Summary `json:"setup,omitempty"`   // map + register + prefault, per run
	GiBps      float64  `json:"gib_per_s"`         // Size / median Prefault; 0 without a prefault
	Huge       float64  `json:"huge_fraction"`     // of Size mapped by huge pages after the last run
	Resident   float64  `json:"resident_fraction"` // of Size resident after the last run
	Note       string   `json:"note,omitempty"`
}

// WriteJSON writes r as one indented JSON object; no results or notes are
// empty lists, not null.
func WriteJSON(w io.Writer, r *Report) error {
	if r.Results == nil {
		r.Results = []Result{}
	}
	if r.Notes == nil {
		r.Notes = []string{}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// csvPhases are the phases, in CSV column order.
var csvPhases = []string{"map", "register", "prefault", "teardown", "setup", "guest_touch"}

func (r *Result) phases() []*Summary {
	return []*Summary{r.Map, r.Register, r.Prefault, r.Teardown, r.Setup, r.GuestTouch}
}

// csvHeader is the first CSV row.
func csvHeader() []string {
	h := []string{"size_bytes", "size", "backing", "method", "peer", "workers"}
	for _, p := range csvPhases {
		h = append(h, p+"_median_ns", p+"_min_ns", p+"_max_ns", p+"_cold_ns", p+"_n")
	}
	return append(h, "gib_per_s", "huge_fraction", "resident_fraction", "note")
}

// WriteCSV writes one row per result. A phase a method does not have is
// empty. The report's notes are not in the CSV; they go to the JSON and
// table forms.
func WriteCSV(w io.Writer, r *Report) error {
	cw := csv.NewWriter(w)
	if err := cw.Write(csvHeader()); err != nil {
		return err
	}
	for _, res := range r.Results {
		row := []string{strconv.FormatUint(res.Size, 10), res.SizeText, res.Backing, res.Method,
			strconv.FormatBool(res.Peer), strconv.Itoa(res.Workers)}
		for _, s := range res.phases() {
			if s == nil {
				row = append(row, "", "", "", "", "")
				continue
			}
			row = append(row, ns(s.Median), ns(s.Min), ns(s.Max), ns(s.Cold), strconv.Itoa(s.N))
		}
		row = append(row, strconv.FormatFloat(res.GiBps, 'f', 3, 64), strconv.FormatFloat(res.Huge, 'f', 3, 64),
			strconv.FormatFloat(res.Resident, 'f', 3, 64), res.Note)
		if err := cw.Write(row); err != nil {
			return err
		}
	}
	cw.Flush()
	return cw.Error()
}

func ns(d time.Duration) string { return strconv.FormatInt(d.Nanoseconds(), 10) }

// WriteTable prints the report for a person: a header saying what was
// measured and how, one row per figure, and the notes.
func WriteTable(w io.Writer, r *Report) error {
	h := r.Host
	fmt.Fprintf(w, "host: %s, %d CPUs, %s RAM, THP enabled=%s defrag=%s shmem_enabled=%s, load %.2f-%.2f\n",
		h.Kernel, h.CPUs, units.Human(h.Memory), h.THP.Enabled, h.THP.Defrag, h.THP.ShmemEnabled, h.LoadStart, h.LoadEnd)
	if h.QEMU != "" || h.GoKVM != "" {
		fmt.Fprintf(w, "peers: %s\n", strings.Join(nonEmpty(h.QEMU, h.GoKVM), "; "))
	}
	fmt.Fprintf(w, "each figure: median of %d runs after %d warm-up, [min-max] of those runs; "+
		"cold = the first run; GiB/s = size / median prefault\n\n", r.Runs, r.Warmup)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "size\tbacking\tmethod\tmap\tregister\tprefault [min-max]\tteardown\tsetup\tcold setup\tGiB/s\thuge\tguest touch\t")
	for _, res := range r.Results {
		method := res.Method
		if res.Peer {
			method = "peer: " + method
		}
		cold := "-"
		if res.Setup != nil {
			cold = units.FormatDuration(res.Setup.Cold)
		}
		gibs := "-"
		if res.GiBps > 0 {
			gibs = fmt.Sprintf("%.2f", res.GiBps)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.0f%%\t%s\t\n", res.SizeText, res.Backing, method,
			medianCell(res.Map), medianCell(res.Register), spreadCell(res.Prefault), medianCell(res.Teardown),
			medianCell(res.Setup), cold, gibs, 100*res.Huge, medianCell(res.GuestTouch))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	var notes []string
	for _, res := range r.Results {
		if res.Note != "" {
			notes = append(notes, fmt.Sprintf("%s %s %s: %s", res.SizeText, res.Backing, res.Method, res.Note))
		}
	}
	notes = append(notes, r.Notes...)
	if len(notes) > 0 {
		fmt.Fprintln(w, "\nnotes:")
		for _, n := range notes {
			fmt.Fprintf(w, "  - %s\n", n)
		}
	}
	return nil
}

func medianCell(s *Summary) string {
	if s == nil {
		return "-"
	}
	return units.FormatDuration(s.Median)
}

func spreadCell(s *Summary) string {
	if s == nil {
		return "-"
	}
	if s.N < 2 {
		return units.FormatDuration(s.Median)
	}
	d := units.FormatDuration
	return fmt.Sprintf("%s [%s-%s]", d(s.Median), d(s.Min), d(s.Max))
}

func nonEmpty(ss ...string) []string {
	var out []string
	for _, s := range ss {
		if s != "" {
			out = append(out, s)
		}
	}
	return out
}
