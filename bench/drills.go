package main

import (
	"context"
	"fmt"
	"os"
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
