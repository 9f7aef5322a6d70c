package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"
)

// Drill 3: DNS stall.

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
