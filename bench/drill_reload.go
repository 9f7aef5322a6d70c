package main

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Drill 8: reload storm.

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
