package discovery

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

// BenchmarkWatcherCost measures what one more Service costs while it runs:
// heap bytes and goroutines per Watcher, each resolved once (3 endpoints),
// with and without health checks (TCP probes that fail at once). Run it
// with -benchtime=1x: b.N is ignored, the number of Watchers is fixed.
//
//	go test ./discovery -run '^$' -bench WatcherCost -benchtime=1x
func BenchmarkWatcherCost(b *testing.B) {
	const n = 1000
	var zone strings.Builder
	for i := range n {
		for j := 1; j <= 3; j++ {
			fmt.Fprintf(&zone, "s%d.bbs.svc.cluster.local. 5 IN A 10.7.%d.%d\n", i, i%250, j)
		}
	}
	srv := dnstest.Start(b, zone.String())
	for _, health := range []bool{false, true} {
		b.Run(fmt.Sprintf("health=%t", health), func(b *testing.B) {
			runtime.GC()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			g0 := runtime.NumGoroutine()
			ws := make([]*Watcher, n)
			for i := range ws {
				svc, _ := ParseService(fmt.Sprintf("s%d.bbs:8080", i), Defaults{})
				cfg := Config{Service: svc, IPv4: true, Resolver: &Resolver{Servers: []string{srv.Addr}},
					RefreshMin: time.Hour, RefreshMax: time.Hour}
				if health {
					cfg.Health = &HealthCheck{TCP: true, Port: 1, Interval: time.Hour, Timeout: 10 * time.Millisecond}
				}
				ws[i] = Start(cfg, nil)
			}
			for _, w := range ws {
				w.Wait(b.Context(), 30*time.Second)
			}
			runtime.GC()
			runtime.ReadMemStats(&after)
			g := runtime.NumGoroutine() - g0
			b.ReportMetric(float64(after.HeapInuse-before.HeapInuse+after.StackInuse-before.StackInuse)/n, "bytes/service")
			b.ReportMetric(float64(g)/n, "goroutines/service")
			for _, w := range ws {
				w.Stop()
			}
		})
	}
}
