package main

import (
	"fmt"
	"os"
	"runtime"
	"strings"
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
	var b strings.Builder
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
		cmd = "go run ./bench " + strings.Join(quoted, " ")
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	fmt.Fprintf(&b, `# Benchmarks and failure drills

caddy-headless side by side with its peers, in one run on one machine, on loopback. Written by
`+"`%s`"+`; `+"`make bench`"+` runs the same on the checkout, building `+"`bin/caddy`"+` first if it
is stale. The harness is [`+"`bench/`"+`](bench/); it needs `+"`wrk`, `nginx` and `haproxy`"+` on the PATH
(`+"`apt-get install wrk nginx haproxy`"+`) and runs them as its own processes, with generated configs.
Run on %s; the whole run took %s.

| machine | |
|---|---|
| CPU | %d cores (%s) |
| kernel | Linux %s |
| Go | %s |
| Caddy | %s with this plugin, built from %s (the same binary runs `+"`headless_proxy`"+`, static upstreams and `+"`dynamic a`"+`) |
| nginx | %s |
| HAProxy | %s |
| wrk | %s |

**Setup.** The cluster DNS stand-in (package `+"`dnstest`"+`, answering like CoreDNS's kubernetes plugin,
TTL %d s) runs inside the harness at %s, so a drill can stall it or change its records at an exact
moment. Endpoints are Go HTTP servers inside the harness at 127.0.6.x:%s, each answering with its
address. The proxies are child processes listening on %s: Caddy (every Caddy config carries the
settings of `+"`Caddyfile.example`"+`: `+"`header_up X-Real-IP`"+`, keep-alive, `+"`max_fails 2`, `fail_duration 3s`, `lb_try_duration 3s`"+`),
nginx with the story's configuration (docs/design.md; `+"`worker_processes auto`"+`), HAProxy (`+"`nbthread 2`"+`,
`+"`resolvers`"+` + `+"`server-template`"+`, `+"`retries 3`, `option redispatch 1`"+`). Everything, load generator
included, shares the same %d cores, so absolute numbers are low and noisy (a few %% between runs);
compare rows within one table, which were measured minutes apart under the same conditions.
Nothing here is a pass/fail test.

`, cmd, time.Now().UTC().Format("2006-01-02 15:04 UTC"), took.Round(time.Second),
		runtime.NumCPU(), cpuModel(), strings.TrimSpace(string(kernel)), runtime.Version(),
		caddyVersion, h.source, versionOf("nginx", "-v"), versionOf("haproxy", "-v"), versionOf("wrk", "--version"),
		zoneTTL, dnsAddr, epPort, host, runtime.NumCPU())
	b.WriteString("## Summary\n\nThe headline of each drill (details, and the variants left out here, in its section below).\n\n")
	b.WriteString(h.headlineTable())
	b.WriteString("\n")
	for _, s := range sections {
		b.WriteString(s.markdown())
		b.WriteString("\n")
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
