package main

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// Drill 7: many services.

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
			return fmt.Sprintf("\theadless_proxy @s%d %s:%s {\n\t\tresolvers %s\n\t\t"+allowLoopback+"\n\t}\n", i, svc, epPort, dnsAddr)
		})},
		{"Caddy, `dynamic a` (refresh 1s)", routes(func(i int, svc string) string {
			return fmt.Sprintf("\treverse_proxy @s%d {\n\t\tdynamic a %s %s {\n\t\t\tresolvers %s\n\t\t\trefresh 1s\n\t\t}\n\t}\n", i, svc, epPort, dnsAddr)
		})},
	}
	var urls []string
	for i := range n {
		urls = append(urls, fmt.Sprintf("http://%%s/s%d/", i))
	}
	// The idle window is 30 s: a single-stack Service asks the other family
	// every 30th lookup, so a shorter window catches that burst or not.
	settle, idleWin, win := h.dur(5*time.Second), h.dur(30*time.Second), h.dur(10*time.Second)
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
		if err := sleep(ctx, idleWin); err != nil {
			return nil, err
		}
		idle := float64(h.dns.Queries()-q0) / idleWin.Seconds()
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
			fmt.Sprintf("%.1f", idle), fmt.Sprintf("%.0f", busy), ms(sm.p50)+" / "+ms(sm.p99), sm.errors)
	}
	return &section{
		intro: fmt.Sprintf("One Caddy with 500 routes (`/s0/` … `/s499/`), each to its own Service of two endpoints. "+
			"Memory and goroutines %s after start; DNS queries counted at the DNS server over %s with no requests, "+
			"then over %s of %d requests/s spread evenly over the 500 routes (each Service asked about once a second).",
			settle, idleWin, win, rate),
		tables: []*table{t},
		notes: []string{"Ours runs one watcher (one goroutine) per Service and asks DNS every second whether " +
			"or not requests come. The Services here are IPv4-only, as in a single-stack cluster: while an answer has " +
			"one address family, the other (AAAA here) is asked only every 30th lookup, so a Service that becomes " +
			"dual-stack is seen within 30 s; about one query per Service per second at the default refresh (an A lookup every 1.0–1.1 s: " +
			"the jitter lengthens the refresh by up to 10%; every 30th with AAAA), which a real cluster DNS should be sized for (`refresh` " +
			"and `versions ipv4` lower it further). `dynamic a` asks only when " +
			"a request finds its cache entry older than `refresh`, on the request path, and its process-wide " +
			"cache holds 100 names, so with 500 Services most requests look DNS up on the request path (fast here, " +
			"where DNS answers at once; see drill 3 for when it does not)."},
	}, nil
}
