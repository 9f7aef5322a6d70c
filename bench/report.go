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
	cmd := commandLine(args)
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

// commandLine is how the report names the command that wrote it.
func commandLine(args []string) string {
	if len(args) == 0 {
		return "make bench"
	}
	quoted := make([]string, len(args))
	for i, a := range args {
		quoted[i] = a
		if strings.ContainsAny(a, " '\"") {
			quoted[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
	}
	return "bin/bench " + strings.Join(quoted, " ")
}

// mergeReport puts into old (a whole report) the sections of fresh (the
// report of a run of some drills) and the rows of its summary table: a
// section or row with the same title replaces the old one, a new section
// goes before the sections the bench does not write (or at the end), a new row at the end of the
// summary table. stamp is added to each merged section, to say which run it
// is from.
func mergeReport(old, fresh string, sections []*section, stamp string) string {
	out := old
	// Summary rows: the data rows of fresh's first table after "## Summary".
	for _, row := range summaryRows(fresh) {
		key := row[:strings.Index(row[2:], " |")+4] // "| first cell |"
		lines := strings.Split(out, "\n")
		start := indexOfLine(lines, "## Summary")
		if start < 0 {
			break
		}
		last, replaced := -1, false
		for i := start + 1; i < len(lines); i++ {
			l := lines[i]
			if strings.HasPrefix(l, "## ") {
				break
			}
			if !strings.HasPrefix(l, "|") {
				if last >= 0 {
					break // the end of the table
				}
				continue
			}
			last = i
			if strings.HasPrefix(l, key) {
				lines[i], replaced = row, true
				break
			}
		}
		if !replaced && last >= 0 {
			lines = append(lines[:last+1], append([]string{row}, lines[last+1:]...)...)
		}
		out = strings.Join(lines, "\n")
	}
	for _, sec := range sections {
		head := "## " + sec.title + "\n"
		i := strings.Index(fresh, head)
		if i < 0 {
			continue
		}
		block := fresh[i:]
		if j := strings.Index(block[len(head):], "\n## "); j >= 0 {
			block = block[:len(head)+j+1]
		}
		block = strings.TrimRight(block, "\n") + "\n\n" + stamp + "\n\n"
		if i := strings.Index(out, head); i >= 0 {
			end := len(out)
			if j := strings.Index(out[i+len(head):], "\n## "); j >= 0 {
				end = i + len(head) + j + 1
			}
			out = out[:i] + block + out[end:]
		} else if i := notFromBench(out); i >= 0 {
			out = out[:i] + block + out[i:]
		} else {
			out = strings.TrimRight(out, "\n") + "\n\n" + block
		}
	}
	return out
}

// summaryRows is the data rows of the table under "## Summary".
func summaryRows(report string) []string {
	lines := strings.Split(report, "\n")
	start := indexOfLine(lines, "## Summary")
	if start < 0 {
		return nil
	}
	var rows []string
	seen := 0
	for _, l := range lines[start+1:] {
		if strings.HasPrefix(l, "## ") {
			break
		}
		if !strings.HasPrefix(l, "|") {
			if seen > 0 {
				break
			}
			continue
		}
		if seen++; seen > 2 { // after the header and its separator
			rows = append(rows, l)
		}
	}
	return rows
}

func indexOfLine(lines []string, l string) int {
	for i, x := range lines {
		if x == l {
			return i
		}
	}
	return -1
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

// notFromBench is where the sections the bench does not write begin in a
// report (those after the drills' numbered ones and the summary: "## `via
// api` on kube-apiserver", "## Storage: …", measured by tests), or -1.
func notFromBench(report string) int {
	for i := 0; ; {
		j := strings.Index(report[i:], "\n## ")
		if j < 0 {
			return -1
		}
		start := i + j + 1
		title := report[start+3:]
		if title != "" && (title[0] < '0' || title[0] > '9') && !strings.HasPrefix(title, "Summary") {
			return start
		}
		i = start
	}
}
