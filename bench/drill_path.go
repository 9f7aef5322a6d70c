package main

import (
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// Drill 1: request path.

var reBench = regexp.MustCompile(`^BenchmarkGetUpstreams/source=([\w-]+)/endpoints=(\d+)(?:-\d+)?\s+\d+\s+(.*)$`)

func drillPath(ctx context.Context, h *harness) (*section, error) {
	count, benchtime := "5", "300ms"
	if h.quick {
		count, benchtime = "1", "50ms"
	}
	args := []string{"test", "-run", "^$", "-bench", "BenchmarkGetUpstreams", "-benchmem", "-count", count, "-benchtime", benchtime, "./caddymodule/"}
	out, err := exec.CommandContext(ctx, "go", args...).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	runs := map[string]map[string][]float64{} // "headless/1000" → unit → values
	for _, line := range strings.Split(string(out), "\n") {
		m := reBench.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil {
			continue
		}
		key := m[1] + "/" + m[2]
		if runs[key] == nil {
			runs[key] = map[string][]float64{}
		}
		f := strings.Fields(m[3])
		for i := 0; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err == nil {
				runs[key][f[i+1]] = append(runs[key][f[i+1]], v)
			}
		}
	}
	if len(runs) == 0 {
		return nil, fmt.Errorf("no BenchmarkGetUpstreams results in:\n%s", out)
	}
	for k, units := range runs {
		pathResults[k] = pathResult{median(units["ns/op"]), median(units["B/op"]), median(units["allocs/op"]), median(units["upstreams/op"])}
	}
	t := &table{header: []string{"endpoints in DNS", "`dynamic headless` ns/op", "`dynamic a` ns/op", "ratio (ours / `dynamic a`)",
		"ours B/op, allocs/op", "`dynamic a` B/op, allocs/op", "upstreams handed out (ours / `dynamic a`)"}}
	for _, n := range []string{"1", "10", "100", "1000"} {
		o, a := pathResults["headless/"+n], pathResults["caddy-a/"+n]
		t.add(n, fmt.Sprintf("%.0f", o.ns), fmt.Sprintf("%.0f", a.ns), ratio(o.ns, a.ns),
			fmt.Sprintf("%.0f B, %.0f", o.bytes, o.allocs), fmt.Sprintf("%.0f B, %.0f", a.bytes, a.allocs),
			fmt.Sprintf("%.0f / %.0f", o.upstreams, a.upstreams))
	}
	return &section{
		intro: fmt.Sprintf("`BenchmarkGetUpstreams` (caddymodule/bench_test.go): the cost of one `GetUpstreams` call on a warm "+
			"cache, ours against Caddy's `dynamic a`, both pointed at the same in-process DNS server. Median of %s runs:\n\n"+
			"    go %s", count, strings.Join(args, " ")),
		tables: []*table{t},
		notes: []string{"Both hand Caddy fresh `*Upstream` copies on every call (Caddy writes into them), so the cost " +
			"grows with the number of endpoints for both; ours allocates them as one block. `dynamic a` stops at what " +
			"one UDP reply holds (Go's resolver does not retry a truncated reply over TCP when a custom resolver is " +
			"set), so at 100 and 1,000 endpoints it does less work because it hands out fewer upstreams."},
	}, nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
