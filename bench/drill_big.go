package main

import (
	"context"
	"fmt"
	"time"
)

// Drill 6: big service.

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
		body := fmt.Sprintf("\theadless_proxy %s:%s {\n\t\tresolvers %s\n\t\t"+allowLoopback+"\n\t}\n", svc, epPort, dnsAddr)
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
	t.add("lookup time (TCP fallback included), mean of `caddy_headless_lookup_duration_seconds`", ms(time.Duration(small.lookupMean*1e9)), ms(time.Duration(large.lookupMean*1e9)), ratio(large.lookupMean, small.lookupMean))
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
		t.add("`GetUpstreams` handing out every endpoint (drill 1; what the hashing policies get per request)", fmt.Sprintf("%.0f ns", o1.ns), fmt.Sprintf("%.0f ns, %.0f B", o.ns, o.bytes), ratio(o.ns, o1.ns))
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
