package caddymodule

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

// The whole per-request path in this process: Caddy's reverse_proxy handler
// (upstream source, provisioning of the upstreams, lb_policy, headers,
// response copy) in front of a transport that answers without a network.

// noNetwork answers 200 at once, or fails for the endpoints down reports,
// and counts the requests each endpoint got when hits is set.
type noNetwork struct {
	down func(dial string) bool
	mu   sync.Mutex
	hits map[string]int
}

func (t *noNetwork) RoundTrip(r *http.Request) (*http.Response, error) {
	if t.hits != nil {
		t.mu.Lock()
		t.hits[r.URL.Host]++
		t.mu.Unlock()
	}
	if t.down != nil && t.down(r.URL.Host) {
		return nil, fmt.Errorf("%s is down", r.URL.Host)
	}
	return &http.Response{StatusCode: 200, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: http.Header{}, Body: http.NoBody, ContentLength: 0, Request: r}, nil
}

// proxy is a provisioned reverse_proxy handler with the given JSON body,
// its transport replaced by tr.
func proxy(tb testing.TB, body string, tr http.RoundTripper) *reverseproxy.Handler {
	tb.Helper()
	ctx, err := caddy.ProvisionContext(&caddy.Config{})
	if err != nil {
		tb.Fatal(err)
	}
	mod, err := ctx.LoadModuleByID("http.handlers.reverse_proxy", json.RawMessage(body))
	if err != nil {
		tb.Fatalf("%s: %v", body, err)
	}
	h := mod.(*reverseproxy.Handler)
	h.Transport = tr
	tb.Cleanup(func() {
		if c, ok := h.DynamicUpstreams.(caddy.CleanerUpper); ok {
			c.Cleanup()
		}
		h.Cleanup()
	})
	return h
}

// serve sends one GET through h and returns the status.
func serve(h *reverseproxy.Handler) int {
	r := httptest.NewRequest("GET", "http://app.example/", nil)
	rec := httptest.NewRecorder()
	r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), rec, &caddyhttp.Server{})
	err := h.ServeHTTP(rec, r, nil)
	if herr, ok := err.(caddyhttp.HandlerError); ok {
		return herr.StatusCode
	}
	if err != nil {
		return 500
	}
	return rec.Code
}

// zoneOf is the A records of name for n endpoints 10.<net>.x.y, and their dials.
func zoneOf(name string, net, n int) (string, []string) {
	var zone strings.Builder
	var dials []string
	for i := range n {
		ip := fmt.Sprintf("10.%d.%d.%d", net, i/250, i%250+1)
		fmt.Fprintf(&zone, "%s.bbs.svc.cluster.local. 5 IN A %s\n", name, ip)
		dials = append(dials, ip+":8080")
	}
	return zone.String(), dials
}

// handlerJSON is a reverse_proxy body for source (static, headless,
// caddy-a) and policy, over the endpoints of name; extra is more fields.
func handlerJSON(source, policy, name, resolver string, dials []string, extra string) string {
	var src string
	switch source {
	case "static":
		var ups []string
		for _, d := range dials {
			ups = append(ups, fmt.Sprintf(`{"dial":%q}`, d))
		}
		src = `"upstreams":[` + strings.Join(ups, ",") + `]`
	case "headless":
		src = fmt.Sprintf(`"dynamic_upstreams":{"source":"headless","service":"%s.bbs:8080","resolvers":[%q],"versions":{"ipv4":true},"refresh_min":"1h"%s}`,
			name, resolver, extra)
		extra = ""
	case "caddy-a":
		src = fmt.Sprintf(`"dynamic_upstreams":{"source":"a","name":"%s.bbs.svc.cluster.local","port":"8080","refresh":"1h","resolver":{"addresses":[%q]},"versions":{"ipv4":true}}`,
			name, resolver)
	}
	return fmt.Sprintf(`{%s,"load_balancing":{"selection_policy":{"policy":%q}%s}}`, src, policy, extra)
}

// The spread over endpoints is not worse for handing each request two
// random candidates than for Caddy's own scan of all of them: over 100,000
// requests to 1,000 endpoints each one gets Binomial(100,000, 1/1,000)
// requests, mean 100, σ ≈ 10, under either. Both must stay within 6σ of the
// mean (by luck, any of the 1,000 falls outside with a chance below 2e-6).
// Simulated: Caddy's lb_policy picks from our source's upstreams or from
// the full list, and no request is in flight (least_conn breaks its ties at
// random, as it does among idle endpoints).
func TestProxyPathSpread(t *testing.T) {
	const n, requests = 1000, 100_000
	zone, dials := zoneOf("spread", 5, n)
	srv := dnstest.Start(t, zone)
	mean, sigma := float64(requests)/n, math.Sqrt(requests*(1.0/n)*(1-1.0/n))
	hosts := map[string]*reverseproxy.Host{} // as Caddy's per-address state
	var all []*reverseproxy.Upstream
	for _, d := range dials {
		hosts[d] = new(reverseproxy.Host)
		all = append(all, &reverseproxy.Upstream{Host: hosts[d], Dial: d})
	}
	r := httptest.NewRequest("GET", "http://app.example/", nil)
	for _, policy := range []string{"random", "least_conn"} {
		h := proxy(t, handlerJSON("headless", policy, "spread", srv.Addr, dials, ""), &noNetwork{})
		for _, source := range []string{"static", "headless"} {
			hits := map[string]int{}
			for range requests {
				pool := all
				if source == "headless" {
					var err error
					if pool, err = h.DynamicUpstreams.GetUpstreams(r); err != nil {
						t.Fatal(err)
					}
					for _, u := range pool {
						u.Host = hosts[u.Dial]
					}
				}
				hits[h.LoadBalancing.SelectionPolicy.Select(pool, r, nil).Dial]++
			}
			var counts []int
			for _, d := range dials {
				counts = append(counts, hits[d])
			}
			lo, hi := slices.Min(counts), slices.Max(counts)
			t.Logf("%s/%s: requests per endpoint %d…%d, max/mean %.2f", source, policy, lo, hi, float64(hi)/mean)
			if len(hits) != n || float64(lo) < mean-6*sigma || float64(hi) > mean+6*sigma {
				t.Errorf("%s/%s: %d endpoints got %d…%d requests, want all %d within %.0f±%.0f", source, policy, len(hits), lo, hi, n, mean, 6*sigma)
			}
		}
	}
}

// With passive health checks, Caddy skips the endpoints it marked down; of
// 8 random candidates all are down with probability f^8, 1/256 at a down
// fraction f = 0.5, and the request fails with 503. Over 20,000 requests
// that is Binomial(20,000, 1/256): mean 78, σ ≈ 8.8, checked to 6σ. A retry
// is handed every endpoint, so with lb_retries no request fails, even with
// 2 candidates (a retry with 2 fresh candidates would fail 1/16 of all
// requests); nor does one with candidates all (with 8 candidates and no
// retry, 5,000 requests see about 20 failures: none by luck has a chance
// of 3e-9).
func TestProxyPathDownFraction(t *testing.T) {
	const n = 1000
	zone, dials := zoneOf("halfdown", 6, n)
	srv := dnstest.Start(t, zone)
	down := map[string]bool{}
	for i, d := range dials {
		down[d] = i%2 == 1
	}
	// Caddy keeps the marks per address for the whole process: the down
	// endpoints tried once under the first case stay marked for the others.
	var mu sync.Mutex
	tried := map[string]bool{}
	tr := &noNetwork{down: func(d string) bool {
		if down[d] {
			mu.Lock()
			tried[d] = true
			mu.Unlock()
		}
		return down[d]
	}}
	for _, tc := range []struct {
		name, extra, lb string
		requests        int
		lo, hi          float64
	}{
		{"candidates 8", "", "", 20_000, 78 - 6*8.8, 78 + 6*8.8},
		// 2 candidates fail a quarter of the first tries: a retry with 2
		// fresh ones would fail a quarter of those again.
		{"candidates 2, lb_retries 1", `,"candidates":2`, `,"retries":1`, 5_000, 0, 0},
		{"candidates all", `,"candidates":-1`, "", 5_000, 0, 0},
	} {
		body := handlerJSON("headless", "random", "halfdown", srv.Addr, dials, tc.extra)
		body = strings.TrimSuffix(body, "}}") + tc.lb + `},"health_checks":{"passive":{"fail_duration":"1h","max_fails":1}}}`
		h := proxy(t, body, tr)
		// Until every down endpoint failed once and is marked down.
		for i := 0; ; i++ {
			mu.Lock()
			marked := len(tried)
			mu.Unlock()
			if marked == n/2 {
				break
			}
			if i > 1_000_000 {
				t.Fatalf("%s: only %d of %d down endpoints tried", tc.name, marked, n/2)
			}
			serve(h)
		}
		failed := 0
		for range tc.requests {
			switch code := serve(h); code {
			case 200:
			case 503:
				failed++
			default:
				t.Fatalf("%s: status %d", tc.name, code)
			}
		}
		t.Logf("%s: %d of %d requests found no endpoint up", tc.name, failed, tc.requests)
		if float64(failed) < tc.lo || float64(failed) > tc.hi {
			t.Errorf("%s: %d of %d requests failed with 503, want %.0f…%.0f", tc.name, failed, tc.requests, tc.lo, tc.hi)
		}
	}
}
