package caddymodule

import (
	"fmt"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

// BenchmarkSplitPaired measures the per-request cost of a split between two
// Services against one Service, paired as BenchmarkProxyPathPaired is: each
// iteration serves one request through each of four handlers (one Service
// of n endpoints, and two Services of n endpoints each weighted 50/50, at
// n = 1 and n = 1,000), in a rotating order, timing each. It reports
// split/single at both sizes, and split@1000/split@1 (1 if the split stays
// O(1) in the endpoints, as the sampled policies should), plus ns per
// request of each handler.
//
//	go test -run '^$' -bench BenchmarkSplitPaired -count 5 ./caddymodule/
func BenchmarkSplitPaired(b *testing.B) {
	b.Setenv("XDG_DATA_HOME", b.TempDir())
	for _, policy := range []string{"random", "round_robin", "ip_hash"} {
		var hs []*reverseproxy.Handler // single 1, split 1, single 1000, split 1000
		for i, n := range []int{1, 1000} {
			vmZone, _ := zoneOf("vm", 10+i, n)
			podZone, podDials := zoneOf("pods", 20+i, n)
			srv := dnstest.Start(b, vmZone+podZone)
			single := proxy(b, handlerJSON("headless", policy, "pods", srv.Addr, podDials, ""), &noNetwork{})
			split := proxy(b, splitJSON(srv.Addr, policy, []int{50, 50}, ""), &noNetwork{})
			resolved(b, split)
			hs = append(hs, single, split)
		}
		b.Run("policy="+policy, func(b *testing.B) {
			spent, i := pairedTimes(b, hs)
			r := func(a, c int) float64 { return float64(spent[a]) / float64(spent[c]) }
			b.ReportMetric(r(1, 0), "split/single@1")
			b.ReportMetric(r(3, 2), "split/single@1000")
			b.ReportMetric(r(3, 1), "split@1000/split@1")
			for k, name := range []string{"single@1", "split@1", "single@1000", "split@1000"} {
				b.ReportMetric(float64(spent[k].Nanoseconds())/float64(i), fmt.Sprintf("ns/req-%s", name))
			}
		})
	}
}
