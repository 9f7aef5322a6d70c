package main

import (
	_ "embed"
	"fmt"
	"os"
	"runtime"
	"strings"
	"text/template"
	"time"
)

// section is one drill's part of BENCHMARKS.md: what was run, the tables, and
// notes on reading them.
type section struct {
	title   string
	intro   string
	tables  []*table
	notes   []string
	elapsed time.Duration
	load    string // 1-minute load average at the start → end of the drill
}

type table struct {
	caption string
	header  []string
	rows    [][]string
}

func (t *table) add(cells ...any) {
	row := make([]string, len(cells))
	for i, c := range cells {
		row[i] = fmt.Sprint(c)
	}
	t.rows = append(t.rows, row)
}

func (s *section) markdown() string {
	var b strings.Builder
	fmt.Fprintf(&b, "## %s\n\n", s.title)
	if s.intro != "" {
		fmt.Fprintf(&b, "%s\n\n", strings.TrimSpace(s.intro))
	}
	for _, t := range s.tables {
		if t.caption != "" {
			fmt.Fprintf(&b, "%s\n\n", t.caption)
		}
		fmt.Fprintf(&b, "| %s |\n|%s\n", strings.Join(t.header, " | "), strings.Repeat("---|", len(t.header)))
		for _, r := range t.rows {
			fmt.Fprintf(&b, "| %s |\n", strings.Join(r, " | "))
		}
		b.WriteString("\n")
	}
	for _, n := range s.notes {
		fmt.Fprintf(&b, "%s\n\n", strings.TrimSpace(n))
	}
	if s.elapsed > 0 {
		fmt.Fprintf(&b, "_Drill time: %s; 1-minute load average of the machine at its start → end: %s._\n", s.elapsed.Round(time.Second), s.load)
	}
	return b.String()
}

// Headline columns.
const (
	colOurs    = "Caddy + `headless_proxy` (ours)"
	colStatic  = "Caddy, static upstreams"
	colA       = "Caddy, `dynamic a` (refresh 1s)"
	colNginx   = "nginx 1.22"
	colHAProxy = "HAProxy 2.6"
)

var headCols = []string{colOurs, colStatic, colA, colNginx, colHAProxy}

// headline records one cell of the summary table (the first value wins).
func (h *harness) headline(row, col, val string) {
	if col == "" {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.head == nil {
		h.head = map[string]map[string]string{}
	}
	if h.head[row] == nil {
		h.head[row] = map[string]string{}
		h.headRows = append(h.headRows, row)
	}
	if _, ok := h.head[row][col]; !ok {
		h.head[row][col] = val
	}
}

// headlineTable is the summary of the drills that ran, one row per drill.
func (h *harness) headlineTable() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.headRows) == 0 {
		return ""
	}
	t := &table{header: append([]string{""}, headCols...)}
	for _, r := range h.headRows {
		cells := []any{r}
		for _, c := range headCols {
			v := h.head[r][c]
			if v == "" {
				v = "—"
			}
			cells = append(cells, v)
		}
		t.add(cells...)
	}
	sec := &section{tables: []*table{t}}
	md := sec.markdown()
	return md[strings.Index(md, "|"):]
}

// report is the whole of BENCHMARKS.md.
func (h *harness) report(sections []*section, took time.Duration, args []string) string {
	caddyVersion, _, _ := strings.Cut(versionOf(h.caddy, "version"), " ")
	cmd := "make bench"
	if len(args) > 0 {
		quoted := make([]string, len(args))
		for i, a := range args {
			quoted[i] = a
			if strings.ContainsAny(a, " '\"") {
				quoted[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
			}
		}
		cmd = "bin/bench " + strings.Join(quoted, " ")
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	info := reportInfo{
		Cmd: cmd, Date: time.Now().UTC().Format("2006-01-02 15:04 UTC"), Took: took.Round(time.Second),
		Cores: runtime.NumCPU(), CPU: cpuModel(), Kernel: strings.TrimSpace(string(kernel)), Go: runtime.Version(),
		Caddy: caddyVersion, Source: h.source, Nginx: versionOf("nginx", "-v"), HAProxy: versionOf("haproxy", "-v"),
		Wrk: versionOf("wrk", "--version"), TTL: zoneTTL, DNS: dnsAddr, EpPort: epPort, Host: host,
		Headline: h.headlineTable(),
	}
	for _, sec := range sections {
		info.Sections = append(info.Sections, sec.markdown())
	}
	return renderReport(info)
}

// reportTemplate is the prose of BENCHMARKS.md around the drills' tables.
//
//go:embed report.md.tmpl
var reportTemplate string

// reportInfo is what the report's prose names: the command, the machine,
// the peers' versions, the setup, and the drills' output.
type reportInfo struct {
	Cmd, Date                      string
	Took                           time.Duration
	Cores                          int
	CPU, Kernel, Go, Caddy, Source string
	Nginx, HAProxy, Wrk            string
	TTL                            int
	DNS, EpPort, Host              string
	Headline                       string
	Sections                       []string
}

func renderReport(info reportInfo) string {
	var b strings.Builder
	if err := template.Must(template.New("report").Parse(reportTemplate)).Execute(&b, info); err != nil {
		panic(err) // the template is part of the program
	}
	return b.String()
}

// --- formatting --------------------------------------------------------------------

func ms(d time.Duration) string {
	switch {
	case d == 0:
		return "—"
	case d < time.Millisecond:
		return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
	case d < 10*time.Second:
		return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
	default:
		return fmt.Sprintf("%.1f s", d.Seconds())
	}
}

func secs(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }

func ratio(v, base float64) string {
	if base == 0 {
		return "—"
	}
	return fmt.Sprintf("×%.2f", v/base)
}

func mib(v float64) string { return fmt.Sprintf("%.1f MiB", v) }
