package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Drill 2: throughput.

// A ratio of two medians over a few rounds of a noisy machine inflates
// gaps; each round measures every proxy minutes apart at most, so the
// ratio is taken per round (paired) and summarized as median and range. A
// second, identical static Caddy (the A/A control) shows how far two equal
// proxies drift apart in this harness: gaps within its range are noise.

// tpRow is one proxy's rounds: requests/s, CPU of the proxy process per
// request, latencies, errors.
type tpRow struct {
	rps, cpuUS, p50, p99 []float64
	errors               int
}

// throughputRounds runs wrk against each target in turn, rounds times
// (each round starting with the next one), after a warm-up each.
func throughputRounds(ctx context.Context, h *harness, targets []target, rounds int, d time.Duration) ([]*proxy, []tpRow, error) {
	proxies := make([]*proxy, len(targets))
	for i, t := range targets {
		var err error
		if proxies[i], err = t.start(ctx); err != nil {
			return nil, nil, err
		}
		if _, err := runWrk(ctx, proxies[i].url, h.dur(2*time.Second)); err != nil { // warm-up
			return nil, nil, err
		}
	}
	rows := make([]tpRow, len(targets))
	for r := 0; r < rounds; r++ {
		for k := range targets {
			i := (r + k) % len(targets)
			before := cpuTicks(proxies[i].Pid())
			res, err := runWrk(ctx, proxies[i].url, d)
			if err != nil {
				return nil, nil, err
			}
			ticks := cpuTicks(proxies[i].Pid()) - before
			row := &rows[i]
			row.rps = append(row.rps, res.rps)
			row.p50 = append(row.p50, float64(res.p50))
			row.p99 = append(row.p99, float64(res.p99))
			if res.requests > 0 {
				row.cpuUS = append(row.cpuUS, float64(ticks)*1e6/clockTicks/float64(res.requests))
			}
			row.errors += res.errors
		}
	}
	return proxies, rows, nil
}

// pairedRatios are rps[r] / base[r] per round.
func pairedRatios(rps, base []float64) []float64 {
	var out []float64
	for r := range rps {
		if r < len(base) && base[r] > 0 {
			out = append(out, rps[r]/base[r])
		}
	}
	return out
}

// ratioRange is "×median (min–max)".
func ratioRange(v []float64) string {
	if len(v) == 0 {
		return "—"
	}
	return fmt.Sprintf("×%.2f (%.2f–%.2f)", median(v), slices.Min(v), slices.Max(v))
}

// throughputTable renders rows, the first being the baseline.
func throughputTable(targets []target, rows []tpRow) *table {
	t := &table{header: []string{"proxy", "requests/s (median)", "each round", "paired ratio to the first row: median (min–max)",
		"proxy CPU per request (median)", "p50", "p99", "errors"}}
	for i, tg := range targets {
		row := rows[i]
		var each []string
		for _, v := range row.rps {
			each = append(each, fmt.Sprintf("%.0f", v))
		}
		t.add(tg.name, fmt.Sprintf("%.0f", median(row.rps)), strings.Join(each, ", "), ratioRange(pairedRatios(row.rps, rows[0].rps)),
			fmt.Sprintf("%.0f µs", median(row.cpuUS)), ms(time.Duration(median(row.p50))), ms(time.Duration(median(row.p99))), row.errors)
	}
	return t
}

// clockTicks is the kernel's USER_HZ, the unit of /proc/<pid>/stat times.
const clockTicks = 100

// cpuTicks is the user + system CPU time of pid and its children (nginx
// and HAProxy workers) so far, in clock ticks.
func cpuTicks(pid int) int64 {
	var sum int64
	for _, p := range append([]int{pid}, children(pid)...) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
		if err != nil {
			continue
		}
		// Fields after the parenthesized command name: state is the 3rd
		// field of the line, utime and stime the 14th and 15th.
		rest := string(b)
		if i := strings.LastIndexByte(rest, ')'); i >= 0 {
			rest = rest[i+1:]
		}
		f := strings.Fields(rest)
		if len(f) > 12 {
			u, _ := strconv.ParseInt(f[11], 10, 64)
			s, _ := strconv.ParseInt(f[12], 10, 64)
			sum += u + s
		}
	}
	return sum
}

// manyEndpoints are n endpoint addresses outside 127.0.6.0/24, which the
// other drills use: 127.0.7.1 onwards, 250 per /24.
func manyEndpoints(n int) []string {
	var out []string
	for i := range n {
		out = append(out, fmt.Sprintf("127.0.%d.%d:%s", 7+i/250, i%250+1, epPort))
	}
	return out
}

func drillThroughput(ctx context.Context, h *harness) (*section, error) {
	eps, err := h.startEndpoints(epAddr(11), epAddr(12), epAddr(13))
	if err != nil {
		return nil, err
	}
	h.setRecords(appName, addrs(eps)...)
	targets := []target{
		{"Caddy, static upstreams (baseline)", func(ctx context.Context) (*proxy, error) {
			return h.startCaddy(ctx, "caddy static", staticProxy(addrs(eps)...), "/")
		}},
		{"Caddy, static upstreams again (A/A control)", func(ctx context.Context) (*proxy, error) {
			return h.startCaddy(ctx, "caddy static 2", staticProxy(addrs(eps)...), "/")
		}},
		{"Caddy, `headless_proxy` (ours)", func(ctx context.Context) (*proxy, error) {
			return h.startCaddy(ctx, "caddy headless", ourProxy(""), "/")
		}},
		{"Caddy, `dynamic a` (refresh 1s)", func(ctx context.Context) (*proxy, error) {
			return h.startCaddy(ctx, "caddy dynamic a", dynamicA("1s"), "/")
		}},
		{"nginx 1.22, the story's config", func(ctx context.Context) (*proxy, error) {
			return h.startNginx(ctx, "nginx", addrs(eps))
		}},
		{"HAProxy 2.6, `server-template` + `resolvers`", func(ctx context.Context) (*proxy, error) {
			return h.startHAProxy(ctx, "haproxy", "1s", 10)
		}},
	}
	rounds, d := 7, 4*time.Second
	if h.quick {
		rounds, d = 2, time.Second
	}
	proxies, rows, err := throughputRounds(ctx, h, targets, rounds, d)
	if err != nil {
		return nil, err
	}
	for i, tg := range targets {
		h.headline("Throughput, requests/s (paired ratio to Caddy static: median of the rounds)", col(tg.name),
			fmt.Sprintf("%.0f (×%.2f)", median(rows[i].rps), median(pairedRatios(rows[i].rps, rows[0].rps))))
	}
	aa := pairedRatios(rows[1].rps, rows[0].rps)
	notes := []string{"wrk, the proxy and the endpoints share the two cores, so these are relative numbers: " +
		"read the paired ratios, and read them against the A/A control's: two identical static Caddys came out " +
		ratioRange(aa) + " of each other, so a gap inside that range is noise. nginx and HAProxy are C and spend less CPU " +
		"per request than any Caddy; the comparison that measures this plugin is ours against Caddy static (same binary, same " +
		"settings; the only difference is where the upstream list comes from). CPU per request is the proxy process's user + " +
		"system time (from /proc, with its workers for nginx and HAProxy) over the requests wrk counted."}
	if share, err := h.pluginCPUShare(ctx, proxies[2]); err != nil {
		notes = append(notes, "(No CPU profile: "+err.Error()+".)")
	} else {
		notes = append(notes, fmt.Sprintf("Where the CPU goes: a 5 s CPU profile of the `headless_proxy` Caddy under the same "+
			"wrk load (Caddy's `/debug/pprof/profile`) puts %.1f%% of its samples in this plugin's own functions and %.1f%% under "+
			"Caddy's per-request preparation of dynamic upstreams (`fillDynamicHost`), which `dynamic a` pays too.", share.plugin, share.dynamic))
	}
	h.stopAll()

	// The same at 100 and 1,000 endpoints: here handing every endpoint to
	// every request would show.
	scale := &table{header: []string{"endpoints", "proxy", "requests/s (median)", "paired ratio to static: median (min–max)",
		"proxy CPU per request (median)", "p99", "errors"}}
	for _, n := range []int{100, 1000} {
		addrsN := manyEndpoints(n)
		if h.quick && n > 100 {
			break
		}
		if _, err := h.startEndpoints(addrsN...); err != nil {
			return nil, err
		}
		name := fmt.Sprintf("app%d.%s", n, domain)
		var ips []string
		for _, a := range addrsN {
			ips = append(ips, strings.TrimSuffix(a, ":"+epPort))
		}
		h.setRecords(name, ips...)
		scaled := []target{
			{"Caddy, static upstreams", func(ctx context.Context) (*proxy, error) {
				return h.startCaddy(ctx, fmt.Sprintf("caddy static %d", n), staticProxy(addrsN...), "/")
			}},
			{"Caddy, `headless_proxy` (ours)", func(ctx context.Context) (*proxy, error) {
				return h.startCaddy(ctx, fmt.Sprintf("caddy headless %d", n), ourProxyFor(name, ""), "/")
			}},
			{"Caddy, `dynamic a` (refresh 1s)", func(ctx context.Context) (*proxy, error) {
				return h.startCaddy(ctx, fmt.Sprintf("caddy dynamic a %d", n), dynamicAFor(name, "1s"), "/")
			}},
		}
		r, dn := 5, 4*time.Second
		if h.quick {
			r, dn = 1, time.Second
		}
		_, rowsN, err := throughputRounds(ctx, h, scaled, r, dn)
		if err != nil {
			return nil, err
		}
		for i, tg := range scaled {
			row := rowsN[i]
			scale.add(n, tg.name, fmt.Sprintf("%.0f", median(row.rps)), ratioRange(pairedRatios(row.rps, rowsN[0].rps)),
				fmt.Sprintf("%.0f µs", median(row.cpuUS)), ms(time.Duration(median(row.p99))), row.errors)
			h.headline(fmt.Sprintf("Throughput at %d endpoints (paired ratio to Caddy static)", n), col(tg.name),
				fmt.Sprintf("%.0f (×%.2f)", median(row.rps), median(pairedRatios(row.rps, rowsN[0].rps))))
		}
		h.stopAll()
	}
	notes = append(notes, "At 100 and 1,000 endpoints (127.0.7.1 onwards, one Go server each, same settings): 5 rounds of the three Caddys (1 with -quick). "+
		"`dynamic a` gets at most the 73 addresses one UDP reply holds (see section 1), so it balances over fewer endpoints.")
	return &section{
		intro: fmt.Sprintf("`wrk -t%d -c%d -d%ds --latency` against each proxy in turn, %d rounds (the proxies take turns, "+
			"each round starting with the next one, so drift in the machine's load spreads over all of them), after a warm-up run each. The same three "+
			"endpoints (127.0.6.11–13) behind every proxy; plain HTTP/1.1 with keep-alive on both sides. "+
			"The DNS-based ones (ours, `dynamic a`, HAProxy) find the endpoints through the DNS stand-in.",
			wrkThreads, wrkConns, int(d.Seconds()), rounds),
		tables: []*table{throughputTable(targets, rows), scale},
		notes:  notes,
	}, nil
}

type cpuShare struct{ plugin, dynamic float64 }

// pluginCPUShare profiles a Caddy for 5s under wrk load and returns the
// percentage of samples in this plugin's functions (flat) and under Caddy's
// fillDynamicHost (cumulative), from `go tool pprof -top`.
func (h *harness) pluginCPUShare(ctx context.Context, p *proxy) (cpuShare, error) {
	var share cpuShare
	done := make(chan error, 1)
	go func() { _, err := runWrk(ctx, p.url, 6*time.Second); done <- err }()
	time.Sleep(500 * time.Millisecond)
	resp, err := http.Get("http://" + p.admin + "/debug/pprof/profile?seconds=5")
	if err != nil {
		<-done
		return share, err
	}
	prof := filepath.Join(h.dir, "cpu.prof")
	f, err := os.Create(prof)
	if err == nil {
		_, err = io.Copy(f, resp.Body)
		f.Close()
	}
	resp.Body.Close()
	if werr := <-done; err == nil {
		err = werr
	}
	if err != nil {
		return share, err
	}
	for _, mode := range []string{"-top", "-top -cum"} {
		args := append([]string{"tool", "pprof"}, strings.Fields(mode)...)
		out, err := exec.CommandContext(ctx, "go", append(args, "-nodecount=100000", "-nodefraction=0", "-edgefraction=0", h.caddy, prof)...).CombinedOutput()
		if err != nil {
			return share, fmt.Errorf("go tool pprof: %v: %s", err, out)
		}
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) < 6 {
				continue
			}
			name := strings.Join(f[5:], " ")
			flat, _ := strconv.ParseFloat(strings.TrimSuffix(f[1], "%"), 64)
			cum, _ := strconv.ParseFloat(strings.TrimSuffix(f[4], "%"), 64)
			switch {
			case mode == "-top" && strings.Contains(name, "caddy-headless/caddy-headless"):
				share.plugin += flat
			case mode == "-top -cum" && strings.Contains(name, "fillDynamicHost") && !strings.Contains(name, ".func"):
				share.dynamic = max(share.dynamic, cum)
			}
		}
	}
	return share, nil
}
