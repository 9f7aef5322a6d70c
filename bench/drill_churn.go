package main

import (
	"context"
	"fmt"
	"time"
)

// Drill 5: churn.

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
