//go:build amd64

package bench

import (
	"errors"
	"fmt"
	"image/color"
	"math"
	"slices"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// chart is the data of the plot: GiB/s of each series (a gmem strategy or a
// peer) in each group (a size and backing).
type chart struct {
	groups []string
	series []string
	values [][]float64 // [series][group]; 0 where the series has no figure
}

// chartData arranges the results with a throughput into groups and series,
// in the order they were measured.
func chartData(r *Report) chart {
	var c chart
	sizes := map[string]bool{}
	for _, res := range r.Results {
		if res.GiBps > 0 {
			sizes[res.SizeText] = true
		}
	}
	group := func(res Result) string {
		if len(sizes) > 1 {
			return res.SizeText + " " + res.Backing
		}
		return res.Backing
	}
	for _, res := range r.Results {
		if res.GiBps <= 0 {
			continue
		}
		if g := group(res); !slices.Contains(c.groups, g) {
			c.groups = append(c.groups, g)
		}
		if s := seriesName(res); !slices.Contains(c.series, s) {
			c.series = append(c.series, s)
		}
	}
	c.values = make([][]float64, len(c.series))
	for i := range c.values {
		c.values[i] = make([]float64, len(c.groups))
	}
	for _, res := range r.Results {
		if res.GiBps <= 0 {
			continue
		}
		c.values[slices.Index(c.series, seriesName(res))][slices.Index(c.groups, group(res))] = res.GiBps
	}
	return c
}

func seriesName(res Result) string {
	if res.Peer {
		return "peer: " + res.Method
	}
	return "gmem " + res.Method
}

// palette holds distinguishable colours for the series.
var palette = []color.RGBA{
	{31, 119, 180, 255}, {174, 199, 232, 255}, {44, 160, 44, 255}, {152, 223, 138, 255},
	{23, 190, 207, 255}, {214, 39, 40, 255}, {255, 152, 150, 255}, {255, 127, 14, 255},
	{255, 187, 120, 255}, {148, 103, 189, 255}, {140, 86, 75, 255}, {227, 119, 194, 255},
	{127, 127, 127, 255}, {188, 189, 34, 255},
}

// WritePlot charts GiB/s per strategy and backing, with the peers, to
// file (.svg or .png), on a log scale: populate rates span two orders of
// magnitude between 4 KiB pages and memset.
func WritePlot(file string, r *Report) error {
	c := chartData(r)
	if len(c.groups) == 0 {
		return errors.New("no figure has a throughput to chart")
	}
	p := plot.New()
	title := "Guest RAM populate throughput"
	if sizes := uniqueSizes(r); len(sizes) == 1 {
		title += ", " + sizes[0] + " guest"
	}
	runs := fmt.Sprintf("median of %d runs", r.Runs)
	if r.Runs == 1 {
		runs = "1 run"
	}
	p.Title.Text = fmt.Sprintf("%s (%s; log scale)\n%s, %d CPUs, THP %s, shmem THP %s", title, runs, r.Host.Kernel,
		r.Host.CPUs, r.Host.THP.Enabled, r.Host.THP.ShmemEnabled)
	p.Y.Label.Text = "GiB/s"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	lo, hi := math.Inf(1), 0.0
	for _, vs := range c.values {
		for _, v := range vs {
			if v > 0 {
				lo, hi = math.Min(lo, v), math.Max(hi, v)
			}
		}
	}
	p.Y.Min = math.Pow(10, math.Floor(math.Log10(lo)))
	p.Y.Max = math.Pow(10, math.Ceil(math.Log10(hi*1.6)))
	p.NominalX(c.groups...)
	p.Add(plotter.NewGrid())

	bars := &groupedBars{values: c.values, width: 0.85 / float64(len(c.series))}
	p.Add(bars)
	var labels plotter.XYLabels
	for s, vs := range c.values {
		for g, v := range vs {
			if v > 0 {
				labels.XYs = append(labels.XYs, plotter.XY{X: bars.x(s, g), Y: v * 1.05})
				labels.Labels = append(labels.Labels, fmt.Sprintf("%.3g", v))
			}
		}
	}
	lab, err := plotter.NewLabels(labels)
	if err != nil {
		return err
	}
	for i := range lab.TextStyle {
		lab.TextStyle[i].Font.Size = vg.Points(6)
		lab.TextStyle[i].Rotation = math.Pi / 2
		lab.TextStyle[i].XAlign = draw.XLeft
		lab.TextStyle[i].YAlign = draw.YCenter
	}
	p.Add(lab)
	for i, s := range c.series {
		p.Legend.Add(s, swatch{palette[i%len(palette)]})
	}
	p.Legend.Top = true
	p.Legend.Left = true
	p.Legend.TextStyle.Font.Size = vg.Points(7)

	width := max(8*vg.Inch, vg.Length(len(c.groups)*len(c.series))*0.22*vg.Inch+1.5*vg.Inch)
	return p.Save(width, 5.5*vg.Inch, file)
}

func uniqueSizes(r *Report) []string {
	var out []string
	for _, res := range r.Results {
		if !slices.Contains(out, res.SizeText) {
			out = append(out, res.SizeText)
		}
	}
	return out
}

// groupedBars draws bars side by side within each group, from the bottom
// of the Y axis (so that a log scale works), in data coordinates.
type groupedBars struct {
	values [][]float64 // [series][group]
	width  float64     // of one bar, in groups
}

// x is the centre of series s's bar in group g.
func (b *groupedBars) x(s, g int) float64 {
	n := float64(len(b.values))
	return float64(g) + (float64(s)-(n-1)/2)*b.width
}

// Plot implements plot.Plotter.
func (b *groupedBars) Plot(c draw.Canvas, plt *plot.Plot) {
	trX, trY := plt.Transforms(&c)
	for s, vs := range b.values {
		col := palette[s%len(palette)]
		for g, v := range vs {
			if v <= 0 {
				continue
			}
			x := b.x(s, g)
			x0, x1 := trX(x-b.width/2), trX(x+b.width/2)
			y0, y1 := trY(plt.Y.Min), trY(math.Min(v, plt.Y.Max))
			pts := []vg.Point{{X: x0, Y: y0}, {X: x0, Y: y1}, {X: x1, Y: y1}, {X: x1, Y: y0}}
			c.FillPolygon(col, c.ClipPolygonY(pts))
		}
	}
}

// DataRange implements plot.DataRanger.
func (b *groupedBars) DataRange() (xmin, xmax, ymin, ymax float64) {
	groups := 0
	ymin, ymax = math.Inf(1), math.Inf(-1)
	for _, vs := range b.values {
		groups = max(groups, len(vs))
		for _, v := range vs {
			if v > 0 {
				ymin, ymax = math.Min(ymin, v), math.Max(ymax, v)
			}
		}
	}
	return -0.5, float64(groups) - 0.5, ymin, ymax
}

// swatch is a legend entry's coloured square.
type swatch struct{ c color.Color }

// Thumbnail implements plot.Thumbnailer.
func (s swatch) Thumbnail(c *draw.Canvas) {
	pts := []vg.Point{{X: c.Min.X, Y: c.Min.Y}, {X: c.Min.X, Y: c.Max.Y}, {X: c.Max.X, Y: c.Max.Y},
		{X: c.Max.X, Y: c.Min.Y}}
	c.FillPolygon(s.c, c.ClipPolygonY(pts))
}
