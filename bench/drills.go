package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// target is a proxy a drill runs against, started on demand.
type target struct {
	name  string
	start func(ctx context.Context) (*proxy, error)
}

// col is the headline column a proxy's name belongs to ("" for variants the
// headline leaves out: tuned settings, defaults that are not the usual choice).
func col(name string) string {
	switch {
	case strings.Contains(name, "tuned") || strings.Contains(name, "default refresh 1m"):
		return ""
	case strings.Contains(name, "(ours"):
		return colOurs
	case strings.Contains(name, "static"):
		return colStatic
	case strings.Contains(name, "dynamic a"):
		return colA
	case strings.Contains(name, "nginx"):
		return colNginx
	case strings.Contains(name, "HAProxy"):
		return colHAProxy
	}
	return ""
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

func addrs(eps []*endpoint) []string {
	var out []string
	for _, e := range eps {
		out = append(out, e.addr)
	}
	return out
}

// pathResult is drill 1's median for one source and N, kept for drill 6.
type pathResult struct{ ns, bytes, allocs, upstreams float64 }

var pathResults = map[string]pathResult{} // "headless/1000"

// --- 1. request path ------------------------------------------------------------------

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

// --- 2. throughput --------------------------------------------------------------------

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
	proxies := make([]*proxy, len(targets))
	for i, t := range targets {
		if proxies[i], err = t.start(ctx); err != nil {
			return nil, err
		}
		if _, err := runWrk(ctx, proxies[i].url, h.dur(2*time.Second)); err != nil { // warm-up
			return nil, err
		}
	}
	rounds, d := 5, 4*time.Second
	if h.quick {
		rounds, d = 1, time.Second
	}
	results := make([][]wrkResult, len(targets))
	for r := 0; r < rounds; r++ {
		for k := range targets {
			i := (r + k) % len(targets) // each round starts with another proxy
			res, err := runWrk(ctx, proxies[i].url, d)
			if err != nil {
				return nil, err
			}
			results[i] = append(results[i], res)
		}
	}
	t := &table{header: []string{"proxy", "requests/s (median)", "each round", "p50", "p99", "errors", "ratio to Caddy static"}}
	var base float64
	for i, tg := range targets {
		var rps, p50, p99 []float64
		var each []string
		errs := 0
		for _, r := range results[i] {
			rps = append(rps, r.rps)
			p50 = append(p50, float64(r.p50))
			p99 = append(p99, float64(r.p99))
			each = append(each, fmt.Sprintf("%.0f", r.rps))
			errs += r.errors
		}
		m := median(rps)
		if i == 0 {
			base = m
		}
		t.add(tg.name, fmt.Sprintf("%.0f", m), strings.Join(each, ", "), ms(time.Duration(median(p50))), ms(time.Duration(median(p99))), errs, ratio(m, base))
		h.headline("Throughput, requests/s (ratio to Caddy static)", col(tg.name), fmt.Sprintf("%.0f (%s)", m, ratio(m, base)))
	}
	notes := []string{"wrk, the proxy and the endpoints share the two cores, so these are relative numbers: " +
		"the ratio column is what to read. nginx and HAProxy are C and spend less CPU per request than any " +
		"Caddy; the comparison that measures this plugin is ours against Caddy static (same binary, same " +
		"settings; the only difference is where the upstream list comes from)."}
	if share, err := h.pluginCPUShare(ctx, proxies[1]); err != nil {
		notes = append(notes, "(No CPU profile: "+err.Error()+".)")
	} else {
		notes = append(notes, fmt.Sprintf("Where the CPU goes: a 5 s CPU profile of the `headless_proxy` Caddy under the same "+
			"wrk load (Caddy's `/debug/pprof/profile`) puts %.1f%% of its samples in this plugin's code and %.1f%% in "+
			"Caddy's own per-request work for dynamic upstreams (`fillDynamicHost`), which `dynamic a` pays too.", share.plugin, share.dynamic))
	}
	return &section{
		intro: fmt.Sprintf("`wrk -t%d -c%d -d%ds --latency` against each proxy in turn, %d rounds (the proxies take turns, "+
			"each round starting with the next one, so drift in the machine's load spreads over all of them), after a warm-up run each. The same three "+
			"endpoints (127.0.6.11–13) behind every proxy; plain HTTP/1.1 with keep-alive on both sides. "+
			"The DNS-based ones (ours, `dynamic a`, HAProxy) find the endpoints through the DNS stand-in.",
			wrkThreads, wrkConns, int(d.Seconds()), rounds),
		tables: []*table{t},
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

// --- 3. DNS stall ------------------------------------------------------------------------

const loadRate = 400 // requests/s of the Go client in the drills

func drillStall(ctx context.Context, h *harness) (*section, error) {
	eps, err := h.startEndpoints(epAddr(11), epAddr(12), epAddr(13))
	if err != nil {
		return nil, err
	}
	targets := []target{
		{"Caddy, `headless_proxy` (ours, refresh 1s)", func(ctx context.Context) (*proxy, error) {
			return h.startCaddy(ctx, "caddy headless", ourProxy(""), "/")
		}},
		{"Caddy, `dynamic a` (refresh 1s)", func(ctx context.Context) (*proxy, error) {
			return h.startCaddy(ctx, "caddy dynamic a", dynamicA("1s"), "/")
		}},
		{"HAProxy, `hold valid 1s`", func(ctx context.Context) (*proxy, error) {
			return h.startHAProxy(ctx, "haproxy", "1s", 10)
		}},
	}
	before, stall, after := h.dur(5*time.Second), 10*time.Second, h.dur(5*time.Second)
	if h.quick {
		stall = 3 * time.Second
	}
	t := &table{header: []string{"proxy", "before: p50 / p99", "during the stall: p50", "p99", "max", "errors", "after: p99, errors", "p99 during / before"}}
	for _, tg := range targets {
		h.setRecords(appName, addrs(eps)...)
		p, err := tg.start(ctx)
		if err != nil {
			return nil, err
		}
		l := startLoad([]string{p.url}, loadRate)
		warm := time.Second
		if err := sleep(ctx, warm+before); err != nil {
			l.stop()
			return nil, err
		}
		// Ours: start the stall just before the watcher's next lookup is due.
		if next, ok := p.nextRefresh(); ok {
			sleep(ctx, time.Until(next)-10*time.Millisecond)
		}
		t0 := l.elapsed()
		h.dns.Mute(true)
		err = sleep(ctx, stall)
		h.dns.Mute(false)
		t1 := l.elapsed()
		if err == nil {
			err = sleep(ctx, after)
		}
		t2 := l.elapsed()
		ss := l.stop()
		p.stop()
		if err != nil {
			return nil, err
		}
		b, d, a := summarize(window(ss, warm, t0)), summarize(window(ss, t0, t1)), summarize(window(ss, t1, t2))
		errs := fmt.Sprint(d.errors)
		if d.errors > 0 {
			errs = fmt.Sprintf("%d of %d (%s)", d.errors, d.n, d.kindList())
		}
		h.headline("10 s DNS stall: p99 latency during it (before it)", col(tg.name), fmt.Sprintf("%s (%s)", ms(d.p99), ms(b.p99)))
		t.add(tg.name, ms(b.p50)+" / "+ms(b.p99), ms(d.p50), ms(d.p99), ms(d.max), errs,
			fmt.Sprintf("%s, %d", ms(a.p99), a.errors), ratio(float64(d.p99), float64(b.p99)))
	}
	return &section{
		intro: fmt.Sprintf("Three endpoints in DNS; an open-loop Go client sends %d requests/s (it does not wait for "+
			"slow answers before sending the next, so a stall shows as latency). After %s, the DNS server stops "+
			"answering (it reads queries and drops them) for %s, then answers again; %s more are measured. Both "+
			"Caddy sources refresh every second, so the stall starts within a second of a refresh falling due and "+
			"covers about ten of them (for ours, the stall starts 10 ms before the watcher's next lookup, read from "+
			"`GET /headless/`). Latency is by the time a request was sent.", loadRate, before, stall, after),
		tables: []*table{t},
		notes: []string{"`dynamic a` asks DNS on the request path when its cache entry is older than `refresh`, " +
			"holding a process-wide lock: during the stall requests queue behind a lookup that waits for Go's " +
			"resolver timeouts (and fail if it fails). Ours keeps serving the last good set " +
			"from memory while the watcher's lookups time out in the background; HAProxy does the same " +
			"(`hold timeout`/`hold refused`)."},
	}, nil
}

// nextRefresh is when the first watcher of a Caddy with our module looks up next.
func (p *proxy) nextRefresh() (time.Time, bool) {
	if p.admin == "" {
		return time.Time{}, false
	}
	resp, err := http.Get("http://" + p.admin + "/headless/")
	if err != nil {
		return time.Time{}, false
	}
	defer resp.Body.Close()
	var ws []struct {
		NextRefresh time.Time `json:"next_refresh"`
	}
	if json.NewDecoder(resp.Body).Decode(&ws) != nil || len(ws) == 0 || ws[0].NextRefresh.IsZero() {
		return time.Time{}, false
	}
	return ws[0].NextRefresh, true
}

// --- 4. convergence ---------------------------------------------------------------------

func drillConvergence(ctx context.Context, h *harness) (*section, error) {
	eps, err := h.startEndpoints(epAddr(11), epAddr(12), epAddr(13))
	if err != nil {
		return nil, err
	}
	caddyT := func(name, body string) target {
		return target{name, func(ctx context.Context) (*proxy, error) { return h.startCaddy(ctx, name, body, "/") }}
	}
	targets := []target{
		caddyT("Caddy, `headless_proxy` (ours, defaults: refresh 1s)", ourProxy("")),
		caddyT("Caddy, `headless_proxy` (ours, tuned: refresh 250ms)", ourProxy("\t\trefresh 250ms\n")),
		caddyT("Caddy, `dynamic a` (default refresh 1m)", dynamicA("")),
		caddyT("Caddy, `dynamic a` (refresh 1s)", dynamicA("1s")),
		{"HAProxy (`timeout resolve 1s`, `hold valid 1s`)", func(ctx context.Context) (*proxy, error) { return h.startHAProxy(ctx, "haproxy", "1s", 10) }},
		{"nginx (resolves names at start)", func(ctx context.Context) (*proxy, error) {
			return h.startNginx(ctx, "nginx", []string{eps[0].addr, eps[1].addr})
		}},
	}
	limit, quiet := max(h.dur(20*time.Second), 6*time.Second), 2*time.Second
	steps := 5
	if h.quick {
		steps = 1
	}
	t := &table{header: []string{"proxy", "first request to the new endpoint: median", "max", "last request to the removed one: median", "max", "steps", "DNS queries/s", "errors"}}
	for _, tg := range targets {
		live, spare := []*endpoint{eps[0], eps[1]}, eps[2]
		h.setRecords(appName, addrs(live)...)
		p, err := tg.start(ctx)
		if err != nil {
			return nil, err
		}
		l := startLoad([]string{p.url}, loadRate)
		q0, tq0 := h.dns.Queries(), time.Now()
		var adds, removes []time.Duration
		addFail, removeFail := false, false
		for step := 0; step < steps && !addFail && !removeFail; step++ {
			// A random moment, so the change does not fall at the same point
			// of a 1s refresh cycle each time.
			if err := sleep(ctx, 2*time.Second+rand.N(time.Second)); err != nil {
				l.stop()
				return nil, err
			}
			// A rolling update's step: one endpoint replaced by another, in one DNS change.
			old, added := live[0], spare
			added.reset()
			t0 := time.Now()
			live, spare = []*endpoint{live[1], added}, old
			h.setRecords(appName, addrs(live)...)
			addDone, removeDone := false, false
			for !addDone || !removeDone {
				if err := sleep(ctx, 20*time.Millisecond); err != nil {
					l.stop()
					return nil, err
				}
				now := time.Now()
				if f := added.first.Load(); f != 0 && !addDone {
					adds, addDone = append(adds, time.Unix(0, f).Sub(t0)), true
				}
				last := time.Unix(0, old.last.Load())
				if !removeDone && now.Sub(maxTime(last, t0)) > quiet {
					removes, removeDone = append(removes, max(last.Sub(t0), 0)), true
				}
				if now.Sub(t0) > limit {
					break
				}
			}
			addFail, removeFail = !addDone, !removeDone
		}
		ss := l.stop()
		qps := float64(h.dns.Queries()-q0) / time.Since(tq0).Seconds()
		p.stop()
		addMed, addMax := fmt.Sprintf("not within %d s", int(limit.Seconds())), "—"
		if !addFail {
			addMed, addMax = secs(quantile(adds, 0.5)), secs(quantile(adds, 1))
		}
		remMed, remMax := fmt.Sprintf("still receiving at %d s", int(limit.Seconds())), "—"
		if !removeFail {
			remMed, remMax = secs(quantile(removes, 0.5)), secs(quantile(removes, 1))
		}
		t.add(tg.name, addMed, addMax, remMed, remMax, max(len(adds), len(removes)), fmt.Sprintf("%.1f", qps), summarize(ss).errors)
		h.headline("Endpoint replaced in DNS: first request to the new one / last to the old one (median)", col(tg.name), addMed+" / "+remMed)
	}
	return &section{
		intro: fmt.Sprintf("Two of the endpoints 127.0.6.11–13 in DNS, the third running but not in DNS; %d requests/s "+
			"through the proxy. Then, up to %d times (2–3 s apart, at a random moment, so the change falls at a different "+
			"point of the refresh cycle each time), one DNS change replaces an endpoint by the spare one, as a rolling update's step does; "+
			"the removed endpoint keeps running, so every request the proxy still sends it is seen. Measured by the "+
			"endpoints themselves: from the change to the first request the new endpoint serves, and to the last "+
			"request the removed one serves (the last before %s without any). Watched for at most %s per step; a "+
			"step that does not converge ends the target's run.", loadRate, steps, quiet, limit),
		tables: []*table{t},
		notes: []string{"Ours follows within one refresh interval (up to 10% earlier, jitter); `dynamic a` only " +
			"when a request finds its cache entry older than `refresh` (1 minute by default). HAProxy re-resolves " +
			"every `timeout resolve` (1s) and moves the server slot to the new address, but keeps reusing the idle " +
			"kept-alive connections it has to the old address, so a removed endpoint that is still up keeps getting " +
			"requests until it closes them (visible in HAProxy's `show servers state`: the slot already has the new " +
			"address). nginx 1.22 (open source) resolves upstream names once, at start or reload, and never follows."},
	}, nil
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// --- 5. churn ---------------------------------------------------------------------------

func drillChurn(ctx context.Context, h *harness) (*section, error) {
	const first, size = 20, 4
	drain := 5 * time.Second
	dur := h.dur(60 * time.Second)
	caddyT := func(name, body string) target {
		return target{name, func(ctx context.Context) (*proxy, error) { return h.startCaddy(ctx, name, body, "/") }}
	}
	var initial []string
	for i := range size {
		initial = append(initial, epAddr(first+i))
	}
	targets := []target{
		caddyT("Caddy, `headless_proxy` (ours, refresh 1s)", ourProxy("")),
		caddyT("Caddy, `dynamic a` (refresh 1s)", dynamicA("1s")),
		{"HAProxy, `hold valid 1s`", func(ctx context.Context) (*proxy, error) { return h.startHAProxy(ctx, "haproxy", "1s", 12) }},
		{"nginx (resolves names at start)", func(ctx context.Context) (*proxy, error) { return h.startNginx(ctx, "nginx", initial) }},
	}
	t := &table{header: []string{"proxy", "requests", "errors", "error kinds", "p50", "p99", "max"}}
	for _, tg := range targets {
		live, err := h.startEndpoints(initial...)
		if err != nil {
			return nil, err
		}
		h.setRecords(appName, addrs(live)...)
		p, err := tg.start(ctx)
		if err != nil {
			return nil, err
		}
		l := startLoad([]string{p.url}, loadRate)
		if err := sleep(ctx, 2*time.Second); err != nil {
			l.stop()
			return nil, err
		}
		tStart := l.elapsed()
		next := first + size
		var stops []*time.Timer
		tick := time.NewTicker(time.Second)
		for end := time.Now().Add(dur); time.Now().Before(end); {
			select {
			case <-ctx.Done():
				tick.Stop()
				l.stop()
				return nil, ctx.Err()
			case <-tick.C:
			}
			// A new endpoint is ready before it is published; the oldest is
			// unpublished, drains, then stops.
			e, err := h.startEndpoint(epAddr(next))
			if err != nil {
				tick.Stop()
				l.stop()
				return nil, err
			}
			next++
			gone := live[0]
			live = append(live[1:], e)
			h.setRecords(appName, addrs(live)...)
			stops = append(stops, time.AfterFunc(drain, func() { gone.stop(time.Second) }))
		}
		tick.Stop()
		if err := sleep(ctx, drain+time.Second); err != nil {
			l.stop()
			return nil, err
		}
		ss := l.stop()
		p.stop()
		for _, s := range stops {
			s.Stop()
		}
		h.stopEndpoints()
		sm := summarize(window(ss, tStart, time.Hour))
		debugSlow(tg.name, ss, p)
		t.add(tg.name, sm.n, sm.errors, sm.kindList(), ms(sm.p50), ms(sm.p99), ms(sm.max))
		h.headline(fmt.Sprintf("Churn, an endpoint replaced every second for %d s: failed requests", int(dur.Seconds())), col(tg.name), fmt.Sprintf("%d of %d", sm.errors, sm.n))
	}
	return &section{
		intro: fmt.Sprintf("%d endpoints; every second for %s one new endpoint starts and is published, and the oldest "+
			"is removed from DNS, keeps serving for a %s drain window, then shuts down (gracefully, then closed "+
			"after 1s). %d requests/s from the open-loop Go client throughout and for %s after; a request is an "+
			"error if it does not get a 200. Caddy configs use the retry settings the README recommends "+
			"(`Caddyfile.example`): `max_fails 2`, `fail_duration 3s`, `lb_try_duration 3s`; HAProxy "+
			"`retries 3` with `option redispatch 1`; nginx its default `proxy_next_upstream error timeout`.",
			size, dur, drain, loadRate, drain+time.Second),
		tables: []*table{t},
		notes: []string{"The Go client retries a request on its own when a kept-alive connection turns out closed " +
			"before anything was sent (as browsers do); those are not errors. nginx keeps the endpoints it resolved " +
			"at start: once they have all been replaced, every request fails."},
	}, nil
}

// stopEndpoints stops every endpoint (the proxies keep running).
func (h *harness) stopEndpoints() {
	h.mu.Lock()
	eps := h.endpoints
	h.endpoints = map[string]*endpoint{}
	h.mu.Unlock()
	for _, e := range eps {
		e.stop(0)
	}
}

// --- 6. big service ---------------------------------------------------------------------

func drillBig(ctx context.Context, h *harness) (*section, error) {
	const n = 1000
	bigName := "big." + domain
	var big []string
	for i := range n {
		big = append(big, fmt.Sprintf("10.3.%d.%d", i/250, i%250+1))
	}
	h.setRecords(bigName, big...)
	eps, err := h.startEndpoints(epAddr(11))
	if err != nil {
		return nil, err
	}
	h.setRecords(appName, addrs(eps)...)
	type result struct {
		endpoints, truncated, lookupMean, tcpPerSec float64
		st                                          procStats
	}
	measure := func(svc string, want int) (result, error) {
		var r result
		body := fmt.Sprintf("\theadless_proxy %s:%s {\n\t\tresolvers %s\n\t}\n", svc, epPort, dnsAddr)
		p, err := h.startCaddy(ctx, "caddy "+svc, body, "")
		if err != nil {
			return r, err
		}
		defer p.stop()
		deadline := time.Now().Add(15 * time.Second)
		for {
			m, err := p.metrics()
			if err == nil && m["caddy_headless_endpoints"] >= float64(want) {
				break
			}
			if time.Now().After(deadline) {
				return r, fmt.Errorf("%s: %v endpoints after 15s (%v)", svc, m["caddy_headless_endpoints"], err)
			}
			if err := sleep(ctx, 20*time.Millisecond); err != nil {
				return r, err
			}
		}
		tcp0 := h.dns.TCPQueries()
		window := h.dur(5 * time.Second)
		if err := sleep(ctx, window); err != nil {
			return r, err
		}
		r.tcpPerSec = float64(h.dns.TCPQueries()-tcp0) / window.Seconds()
		m, err := p.metrics()
		if err != nil {
			return r, err
		}
		r.endpoints = m["caddy_headless_endpoints"]
		r.truncated = m["caddy_headless_truncated_replies_total"]
		if c := m["caddy_headless_lookup_duration_seconds_count"]; c > 0 {
			r.lookupMean = m["caddy_headless_lookup_duration_seconds_sum"] / c
		}
		r.st = p.stats()
		return r, nil
	}
	small, err := measure(appName, 1)
	if err != nil {
		return nil, err
	}
	large, err := measure(bigName, n)
	if err != nil {
		return nil, err
	}
	t := &table{header: []string{"", "1 endpoint", "1,000 endpoints", "ratio"}}
	t.add("endpoints resolved", small.endpoints, large.endpoints, "")
	t.add("lookup time (A and AAAA, TCP fallback included), mean of `caddy_headless_lookup_duration_seconds`", ms(time.Duration(small.lookupMean*1e9)), ms(time.Duration(large.lookupMean*1e9)), ratio(large.lookupMean, small.lookupMean))
	t.add("truncated UDP replies (asked again over TCP), total", small.truncated, large.truncated, "")
	t.add("TCP queries per second at the DNS server", fmt.Sprintf("%.1f", small.tcpPerSec), fmt.Sprintf("%.1f", large.tcpPerSec), "")
	t.add("Caddy RSS", mib(small.st.rssMiB), mib(large.st.rssMiB), ratio(large.st.rssMiB, small.st.rssMiB))
	t.add("Go heap in use", mib(small.st.heapMiB), mib(large.st.heapMiB), ratio(large.st.heapMiB, small.st.heapMiB))
	t.add("goroutines", small.st.goroutines, large.st.goroutines, "")
	h.headline("A Service of 1,000 endpoints: endpoints used", colOurs,
		fmt.Sprintf("%.0f (lookup %s, TCP after the truncated UDP reply)", large.endpoints, ms(time.Duration(large.lookupMean*1e9))))
	if a, ok := pathResults["caddy-a/1000"]; ok {
		h.headline("A Service of 1,000 endpoints: endpoints used", colA, fmt.Sprintf("%.0f (what one UDP reply holds)", a.upstreams))
	}
	if o, ok := pathResults["headless/1000"]; ok {
		o1 := pathResults["headless/1"]
		a := pathResults["caddy-a/1000"]
		t.add("`GetUpstreams`, per request (drill 1)", fmt.Sprintf("%.0f ns", o1.ns), fmt.Sprintf("%.0f ns, %.0f B", o.ns, o.bytes), ratio(o.ns, o1.ns))
		t.add("`dynamic a` on the same 1,000 (drill 1)", "", fmt.Sprintf("%.0f upstreams of 1,000, %.0f ns", a.upstreams, a.ns), "")
	}
	return &section{
		intro: "Ours (`headless_proxy`, defaults: A and AAAA, refresh 1s) for a Service of 1,000 A records " +
			"(10.3.x.y; no requests are sent to them) against the same config for a 1-endpoint Service. " +
			"1,000 A records do not fit the 1,232-byte EDNS0 UDP reply, so every lookup is a truncated UDP reply " +
			"followed by a TCP query.",
		tables: []*table{t},
	}, nil
}

// --- 7. many services ---------------------------------------------------------------------

func drillMany(ctx context.Context, h *harness) (*section, error) {
	n := 500
	eps, err := h.startEndpoints(epAddr(11), epAddr(12))
	if err != nil {
		return nil, err
	}
	for i := range n {
		h.setRecords(fmt.Sprintf("svc%d.%s", i, domain), addrs(eps)...)
	}
	routes := func(one func(i int, svc string) string) string {
		var b strings.Builder
		for i := range n {
			fmt.Fprintf(&b, "\t@s%d path /s%d /s%d/*\n%s", i, i, i, one(i, fmt.Sprintf("svc%d.%s", i, domain)))
		}
		return b.String()
	}
	variants := []struct{ name, body string }{
		{"Caddy, static upstreams (baseline)", routes(func(i int, _ string) string {
			return fmt.Sprintf("\treverse_proxy @s%d %s\n", i, strings.Join(addrs(eps), " "))
		})},
		{"Caddy, `headless_proxy` (ours, defaults)", routes(func(i int, svc string) string {
			return fmt.Sprintf("\theadless_proxy @s%d %s:%s {\n\t\tresolvers %s\n\t}\n", i, svc, epPort, dnsAddr)
		})},
		{"Caddy, `dynamic a` (refresh 1s)", routes(func(i int, svc string) string {
			return fmt.Sprintf("\treverse_proxy @s%d {\n\t\tdynamic a %s %s {\n\t\t\tresolvers %s\n\t\t\trefresh 1s\n\t\t}\n\t}\n", i, svc, epPort, dnsAddr)
		})},
	}
	var urls []string
	for i := range n {
		urls = append(urls, fmt.Sprintf("http://%%s/s%d/", i))
	}
	settle, win := h.dur(5*time.Second), h.dur(10*time.Second)
	rate := 500
	t := &table{header: []string{"config (500 services)", "start → first answer", "RSS", "Go heap", "goroutines",
		"DNS queries/s, idle", "DNS queries/s, under load", "p50 / p99 under load", "errors"}}
	var base procStats
	for i, v := range variants {
		t0 := time.Now()
		p, err := h.startCaddy(ctx, v.name, v.body, "/s0/")
		if err != nil {
			return nil, err
		}
		startup := time.Since(t0)
		if err := sleep(ctx, settle); err != nil {
			return nil, err
		}
		st := p.stats()
		if i == 0 {
			base = st
		}
		q0 := h.dns.Queries()
		if err := sleep(ctx, win); err != nil {
			return nil, err
		}
		idle := float64(h.dns.Queries()-q0) / win.Seconds()
		listen := strings.TrimSuffix(strings.TrimPrefix(p.url, "http://"), "/")
		var us []string
		for _, u := range urls {
			us = append(us, fmt.Sprintf(u, listen))
		}
		q0 = h.dns.Queries()
		l := startLoad(us, rate)
		err = sleep(ctx, win)
		busy := float64(h.dns.Queries()-q0) / win.Seconds()
		sm := summarize(l.stop())
		p.stop()
		if err != nil {
			return nil, err
		}
		h.headline("500 Services: RSS, DNS queries/s idle, p99 under load", col(v.name), fmt.Sprintf("%s, %.0f q/s, %s", mib(st.rssMiB), idle, ms(sm.p99)))
		t.add(v.name, secs(startup), fmt.Sprintf("%s (%s)", mib(st.rssMiB), ratio(st.rssMiB, base.rssMiB)),
			fmt.Sprintf("%s (%s)", mib(st.heapMiB), ratio(st.heapMiB, base.heapMiB)),
			fmt.Sprintf("%d (+%d)", st.goroutines, st.goroutines-base.goroutines),
			fmt.Sprintf("%.0f", idle), fmt.Sprintf("%.0f", busy), ms(sm.p50)+" / "+ms(sm.p99), sm.errors)
	}
	return &section{
		intro: fmt.Sprintf("One Caddy with 500 routes (`/s0/` … `/s499/`), each to its own Service of two endpoints. "+
			"Memory and goroutines %s after start; DNS queries counted at the DNS server over %s with no requests, "+
			"then over %s of %d requests/s spread evenly over the 500 routes (each Service asked about once a second).",
			settle, win, win, rate),
		tables: []*table{t},
		notes: []string{"Ours runs one watcher (one goroutine) per Service and asks A and AAAA every second whether " +
			"or not requests come: about 2 × 500 queries/s for 500 Services at the default refresh, which a real " +
			"cluster DNS should be sized for (`refresh` and `versions ipv4` lower it). `dynamic a` asks only when " +
			"a request finds its cache entry older than `refresh`, on the request path, and its process-wide " +
			"cache holds 100 names, so with 500 Services most requests look DNS up on the request path (fast here, " +
			"where DNS answers at once; see drill 3 for when it does not)."},
	}, nil
}

// --- 8. reload storm --------------------------------------------------------------------

func drillReload(ctx context.Context, h *harness) (*section, error) {
	eps, err := h.startEndpoints(epAddr(11), epAddr(12), epAddr(13))
	if err != nil {
		return nil, err
	}
	h.setRecords(appName, addrs(eps)...)
	variants := []struct{ name, body string }{
		{"Caddy, static upstreams (baseline)", staticProxy(addrs(eps)...)},
		{"Caddy, `headless_proxy` (ours)", ourProxy("")},
		{"Caddy, `dynamic a` (refresh 1s)", dynamicA("1s")},
	}
	reloads := 50
	if h.quick {
		reloads = 10
	}
	const rate = 300
	t := &table{header: []string{"config", "reloads OK", "reload time p50 / max", "requests", "errors: HTTP status ≠ 200",
		"errors: connection closed or reset", "goroutines before → after", "RSS before → after"}}
	for _, v := range variants {
		p, err := h.startCaddy(ctx, v.name, v.body, "/")
		if err != nil {
			return nil, err
		}
		// Before and after are measured at rest: 1s after the load stopped and
		// the client closed its connections.
		warm := startLoad([]string{p.url}, rate)
		err = sleep(ctx, 3*time.Second)
		warm.stop()
		if err == nil {
			err = sleep(ctx, 2*time.Second)
		}
		if err != nil {
			return nil, err
		}
		before := p.stats()
		l := startLoad([]string{p.url}, rate)
		tStart := l.elapsed()
		var took []time.Duration
		okN, retried := 0, 0
		var lastErr error
		for range reloads {
			t0 := time.Now()
			err := p.reload(v.body)
			var status *loadStatusError
			if err != nil && !errors.As(err, &status) {
				// The admin connection closed under the POST (Caddy swaps its
				// admin server during a load): once more.
				retried++
				time.Sleep(100 * time.Millisecond)
				err = p.reload(v.body)
			}
			if err != nil {
				lastErr = err
			} else {
				okN++
			}
			took = append(took, time.Since(t0))
		}
		err = sleep(ctx, 3*time.Second)
		ss := l.stop()
		if err == nil {
			err = sleep(ctx, 2*time.Second)
		}
		after := p.stats()
		p.stop()
		if err != nil {
			return nil, err
		}
		sm := summarize(window(ss, tStart, time.Hour))
		okS := fmt.Sprintf("%d / %d", okN, reloads)
		if retried > 0 {
			okS += fmt.Sprintf(" (%d sent twice: the admin connection closed under the first)", retried)
		}
		if lastErr != nil {
			okS += " (" + lastErr.Error() + ")"
		}
		errS := fmt.Sprint(sm.errors - sm.httpErrors)
		if sm.errors > sm.httpErrors {
			errS += " (" + sm.kindList() + ")"
		}
		h.headline(fmt.Sprintf("%d config reloads under load: error answers; connections Caddy closed under a request", reloads), col(v.name),
			fmt.Sprintf("%d; %d of %d", sm.httpErrors, sm.errors-sm.httpErrors, sm.n))
		t.add(v.name, okS, ms(quantile(took, 0.5))+" / "+ms(quantile(took, 1)), sm.n, sm.httpErrors, errS,
			fmt.Sprintf("%d → %d", before.goroutines, after.goroutines),
			fmt.Sprintf("%s → %s", mib(before.rssMiB), mib(after.rssMiB)))
	}
	return &section{
		intro: fmt.Sprintf("%d requests/s from the Go client; after 3 s, %d `POST /load` of the same Caddyfile in a row "+
			"(with `Cache-Control: must-revalidate`, so Caddy really reloads each time), then 3 s more. Goroutines "+
			"and RSS of the Caddy process at rest (2 s after the load stopped and the client closed its "+
			"connections) after a 3 s warm-up, and after the storm.", rate, reloads),
		tables: []*table{t},
		notes: []string{"Ours shares watchers between configs through a `caddy.UsagePool`, so each reload takes over " +
			"the running watcher (no new lookup, no cold start) and the old config's release does not stop it. " +
			"The Go client (HTTP/1.1, keep-alive) retries on its own when a kept-alive connection of a replaced " +
			"server closes under a request, as browsers do; what remains as transport errors (`EOF`, `connection " +
			"reset`) are client connections Caddy itself closes or resets while handing its listener over to the new " +
			"server (SO_REUSEPORT), with any upstream source (compare the static baseline); an HTTP status other " +
			"than 200 would mean the proxy had no upstreams for a moment. Goroutines after the storm include the idle upstream connections " +
			"of the replaced configs' transports, which live until their keep-alive timeout (120 s here) in every variant."},
	}, nil
}

// debugSlow prints the requests that took over 300ms, with BENCH_DEBUG=1.
func debugSlow(name string, ss []sample, p *proxy) {
	if os.Getenv("BENCH_DEBUG") == "" {
		return
	}
	for _, s := range ss {
		if s.took > 300*time.Millisecond || !s.ok() {
			fmt.Fprintf(os.Stderr, "%s: at %s took %s status %d %s\n", name, s.at, s.took, s.status, s.err)
		}
	}
	fmt.Fprintf(os.Stderr, "%s log:\n%s\n", name, tail(p.log, 30))
}
