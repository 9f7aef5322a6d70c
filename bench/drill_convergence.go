package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"
)

// Drill 4: convergence.

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
		notes: []string{"Ours follows within one refresh interval (plus up to 10%, jitter); `dynamic a` only " +
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
