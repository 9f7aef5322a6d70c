package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Drill 2: throughput.

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
