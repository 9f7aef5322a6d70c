package caddymodule

import (
	"context"
	"fmt"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

// BenchmarkGetUpstreams compares the request-path cost of our source with
// Caddy's own `dynamic a` on a warm cache, for services of N endpoints.
// upstreams/op shows how many endpoints each source actually hands out: with a
// custom resolver, Caddy's source cannot get past one truncated UDP reply.
//
//	go test -run '^$' -bench BenchmarkGetUpstreams -benchmem ./caddymodule/
func BenchmarkGetUpstreams(b *testing.B) {
	for _, n := range []int{1, 10, 100, 1000} {
		var zone strings.Builder
		for i := range n {
			fmt.Fprintf(&zone, "app%d.bbs.svc.cluster.local. 5 IN A 10.2.%d.%d\n", n, i/250, i%250+1)
		}
		srv := dnstest.Start(b, zone.String())
		ctx, cancel := newCtx(b)
		b.Cleanup(func() { cancel() })

		sources := []struct {
			name string
			src  reverseproxy.UpstreamSource
		}{
			// Both refresh hourly, so no lookup runs during the measurement.
			{"headless", &Headless{Service: fmt.Sprintf("app%d.bbs:8080", n), Resolvers: []string{srv.Addr}, Versions: ipv4Only(),
				RefreshMin: caddy.Duration(time.Hour)}},
			// Caddy caches by name in a process-wide map: a distinct name per N.
			{"caddy-a", &reverseproxy.AUpstreams{Name: fmt.Sprintf("app%d.bbs.svc.cluster.local", n), Port: "8080", Refresh: caddy.Duration(time.Hour),
				Resolver: &reverseproxy.UpstreamResolver{Addresses: []string{srv.Addr}}, Versions: ipv4Only()}},
		}
		for _, s := range sources {
			if err := s.src.(caddy.Provisioner).Provision(ctx); err != nil {
				b.Fatal(err)
			}
			if c, ok := s.src.(caddy.CleanerUpper); ok {
				b.Cleanup(func() { c.Cleanup() })
			}
			b.Run(fmt.Sprintf("source=%s/endpoints=%d", s.name, n), func(b *testing.B) {
				r := httptest.NewRequest("GET", "/", nil)
				r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer()))
				ups, err := s.src.GetUpstreams(r) // warm the cache
				if err != nil || len(ups) == 0 {
					b.Fatalf("warm-up: %d upstreams, %v", len(ups), err)
				}
				b.ReportAllocs()
				b.ResetTimer()
				for b.Loop() {
					ups, _ = s.src.GetUpstreams(r)
				}
				b.ReportMetric(float64(len(ups)), "upstreams/op")
			})
		}
	}
}

func ipv4Only() *reverseproxy.IPVersions {
	yes := true
	return &reverseproxy.IPVersions{IPv4: &yes}
}

// BenchmarkProxyPath measures the whole per-request path in this process:
// Caddy's reverse_proxy handler ServeHTTP, with upstreams from a static list,
// from our source or from Caddy's `dynamic a`, under each lb_policy, in front
// of a transport that answers without a network. Compare the rows of one run
// as ratios (static is the baseline; caddy-a gets at most what fits one UDP
// reply, see upstreams/op of BenchmarkGetUpstreams).
//
//	go test -run '^$' -bench BenchmarkProxyPath -benchmem ./caddymodule/
func BenchmarkProxyPath(b *testing.B) {
	b.Setenv("XDG_DATA_HOME", b.TempDir())
	// Sources innermost: the rows compared with each other run back to
	// back, not minutes apart on a machine whose load drifts.
	for _, policy := range []string{"random", "least_conn", "round_robin", "first", "ip_hash"} {
		for _, n := range []int{1, 10, 100, 1000} {
			name := fmt.Sprintf("path%d", n)
			zone, dials := zoneOf(name, 2, n)
			srv := dnstest.Start(b, zone)
			for _, source := range []string{"static", "headless", "caddy-a"} {
				h := proxy(b, handlerJSON(source, policy, name, srv.Addr, dials, ""), &noNetwork{})
				b.Run(fmt.Sprintf("source=%s/policy=%s/endpoints=%d", source, policy, n), func(b *testing.B) {
					if code := serve(h); code != 200 { // warm the caches
						b.Fatalf("warm-up: status %d", code)
					}
					b.ReportAllocs()
					for b.Loop() {
						serve(h)
					}
				})
			}
		}
	}
}

// BenchmarkProxyPathPaired measures what BenchmarkProxyPath compares, but
// paired: each iteration serves one request through each of four handlers
// (static and ours, at 1 and at 1,000 endpoints), in a rotating order, and
// times each, so that all four see the same machine load, GC and caches.
// It reports the ratios a reader wants (ns/op is the sum of the four):
// ours/static at 1 and at 1,000 endpoints, and ours at 1,000 over ours at 1.
// On a shared 2-core machine the separate sub-benchmarks of
// BenchmarkProxyPath drift by ±30 % between rows; these ratios do not.
//
//	go test -run '^$' -bench BenchmarkProxyPathPaired -count 5 ./caddymodule/
func BenchmarkProxyPathPaired(b *testing.B) {
	b.Setenv("XDG_DATA_HOME", b.TempDir())
	for _, policy := range []string{"random", "least_conn", "round_robin", "first", "ip_hash"} {
		var hs []*reverseproxy.Handler // static 1, ours 1, static 1000, ours 1000
		for _, n := range []int{1, 1000} {
			name := fmt.Sprintf("paired%d", n)
			zone, dials := zoneOf(name, 3, n)
			srv := dnstest.Start(b, zone)
			for _, source := range []string{"static", "headless"} {
				hs = append(hs, proxy(b, handlerJSON(source, policy, name, srv.Addr, dials, ""), &noNetwork{}))
			}
		}
		b.Run("policy="+policy, func(b *testing.B) {
			spent, _ := pairedTimes(b, hs)
			r := func(a, c int) float64 { return float64(spent[a]) / float64(spent[c]) }
			b.ReportMetric(r(1, 0), "ours/static@1")
			b.ReportMetric(r(3, 2), "ours/static@1000")
			b.ReportMetric(r(3, 1), "ours@1000/ours@1")
		})
	}
}

// pairedTimes serves one request of each handler of hs per iteration, in a
// rotating order, and returns the time each spent and the iterations: ratios
// of handlers timed side by side hold on a noisy machine where separate
// benchmarks drift.
func pairedTimes(b *testing.B, hs []*reverseproxy.Handler) (spent []time.Duration, n int) {
	for _, h := range hs {
		if code := serve(h); code != 200 { // warm the caches
			b.Fatalf("warm-up: status %d", code)
		}
	}
	spent = make([]time.Duration, len(hs))
	for b.Loop() {
		for j := range hs {
			k := (n + j) % len(hs)
			t0 := time.Now()
			serve(hs[k])
			spent[k] += time.Since(t0)
		}
		n++
	}
	return spent, n
}
