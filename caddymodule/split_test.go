package caddymodule

import (
	"bytes"
	"fmt"
	"math"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
	"github.com/caddy-headless/caddy-headless/internal/poll"
)

// splitJSON is a reverse_proxy body whose one headless source holds the
// Services vm and pods of the bbs namespace with weights (none if nil).
func splitJSON(resolver, policy string, weights []int, extra string) string {
	var svcs []string
	for i, name := range []string{"vm", "pods"} {
		w := ""
		if weights != nil {
			w = fmt.Sprintf(`,"weight":%d`, weights[i])
		}
		svcs = append(svcs, fmt.Sprintf(`{"service":"%s.bbs:8080"%s}`, name, w))
	}
	return fmt.Sprintf(`{"dynamic_upstreams":{"source":"headless","services":[%s],"resolvers":[%q],"versions":{"ipv4":true},"refresh_min":"1h"%s},"load_balancing":{"selection_policy":{"policy":%q}}}`,
		strings.Join(svcs, ","), resolver, extra, policy)
}

// resolved waits for the first answer of every Service of h's source.
func resolved(t testing.TB, h *reverseproxy.Handler) *Headless {
	t.Helper()
	src := h.DynamicUpstreams.(*Headless)
	for _, u := range src.uses {
		if _, err := u.watcher.RefreshNow(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	return src
}

// Over 20,000 requests through Caddy's reverse_proxy (lb_policy random, two
// candidates per request), each Service's share is Binomial(20,000, p) with p
// its weight's share; checked to 5σ (by luck one of these 14 counts falls
// outside with a chance below 1e-5). The VM's one endpoint gets the VM
// Service's share, not share/N: a Service's share is spread over its own
// endpoints, each of which is checked to 5σ as well. Without weights every
// endpoint weighs the same: the VM gets 1/21 of the requests beside 20 pods.
func TestSplitShares(t *testing.T) {
	const requests = 20_000
	for _, tc := range []struct {
		name    string
		pods    int
		weights []int
		vmShare float64
	}{
		{"1/99, 5 pods", 5, []int{1, 99}, 0.01},
		{"10/90, 5 pods", 5, []int{10, 90}, 0.10},
		{"50/50, 5 pods", 5, []int{50, 50}, 0.50},
		{"10/90, 20 pods", 20, []int{10, 90}, 0.10},
		{"90/10, 20 pods", 20, []int{90, 10}, 0.90},
		{"no weights, 5 pods", 5, nil, 1.0 / 6},
		{"no weights, 20 pods", 20, nil, 1.0 / 21},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vmZone, vmDials := zoneOf("vm", 1, 1)
			podZone, podDials := zoneOf("pods", 2, tc.pods)
			srv := dnstest.Start(t, vmZone+podZone)
			tr := &noNetwork{hits: map[string]int{}}
			h := proxy(t, splitJSON(srv.Addr, "random", tc.weights, ""), tr)
			resolved(t, h)
			for range requests {
				if code := serve(h); code != 200 {
					t.Fatalf("status %d", code)
				}
			}
			within := func(what string, got int, p float64) {
				mean, sigma := requests*p, math.Sqrt(requests*p*(1-p))
				if math.Abs(float64(got)-mean) > 5*sigma {
					t.Errorf("%s: %d of %d requests, want %.0f±%.0f (5σ)", what, got, requests, mean, 5*sigma)
				}
			}
			vm, pods := tr.hits[vmDials[0]], 0
			for _, d := range podDials {
				pods += tr.hits[d]
				within("pod "+d, tr.hits[d], (1-tc.vmShare)/float64(tc.pods))
			}
			t.Logf("vm %d, pods %d (%.2f%% to the VM, want %.2f%%)", vm, pods, 100*float64(vm)/requests, 100*tc.vmShare)
			if vm+pods != requests {
				t.Fatalf("%d requests reached vm and pods, want %d: %v", vm+pods, requests, tr.hits)
			}
			within("vm", vm, tc.vmShare)
		})
	}
}

// With a hashing lb_policy the Service is chosen by the same key: a client
// (its address, for ip_hash) always lands on the same side, and over 2,000
// clients the sides still get the weights' shares (5σ).
func TestSplitSticky(t *testing.T) {
	vmZone, vmDials := zoneOf("vm", 1, 1)
	podZone, _ := zoneOf("pods", 2, 5)
	srv := dnstest.Start(t, vmZone+podZone)
	h := proxy(t, splitJSON(srv.Addr, "ip_hash", []int{30, 70}, ""), &noNetwork{})
	resolved(t, h)
	const clients = 2000
	onVM := 0
	for c := range clients {
		r := httptest.NewRequest("GET", "http://app.example/", nil)
		r.RemoteAddr = fmt.Sprintf("192.0.%d.%d:%d", c/250, c%250+1, 40000+c)
		first := ""
		for try := range 5 {
			ups, err := h.DynamicUpstreams.GetUpstreams(r)
			if err != nil {
				t.Fatal(err)
			}
			side := "pods"
			if ups[0].Dial == vmDials[0] {
				side = "vm"
			}
			if try == 0 {
				first = side
			} else if side != first {
				t.Fatalf("client %s went to %s, then to %s", r.RemoteAddr, first, side)
			}
		}
		if first == "vm" {
			onVM++
		}
	}
	mean, sigma := clients*0.3, math.Sqrt(clients*0.3*0.7)
	if math.Abs(float64(onVM)-mean) > 5*sigma {
		t.Errorf("%d of %d clients on the VM, want %.0f±%.0f", onVM, clients, mean, 5*sigma)
	}
}

// The cookie policy's client stays with the Service of the endpoint its
// cookie names, whatever the draw.
func TestSplitCookie(t *testing.T) {
	vmZone, _ := zoneOf("vm", 1, 1)
	podZone, podDials := zoneOf("pods", 2, 5)
	srv := dnstest.Start(t, vmZone+podZone)
	h := proxy(t, splitJSON(srv.Addr, "cookie", []int{99, 1}, ""), &noNetwork{})
	resolved(t, h)
	r := httptest.NewRequest("GET", "http://app.example/", nil)
	r.Header.Set("Cookie", "lb="+hmacHex("", podDials[3]))
	for range 200 {
		ups, err := h.DynamicUpstreams.GetUpstreams(r)
		if err != nil {
			t.Fatal(err)
		}
		if len(ups) != 5 {
			t.Fatalf("a client with a pod's cookie was handed %d upstreams (%s), want the 5 pods", len(ups), ups[0].Dial)
		}
	}
}

// The pods' Service emptied (NXDOMAIN) while requests flow: none fails,
// all go to the VM; back, the split resumes with the next answer.
func TestSplitServiceEmptied(t *testing.T) {
	vmZone, vmDials := zoneOf("vm", 1, 1)
	podZone, podDials := zoneOf("pods", 2, 5)
	srv := dnstest.Start(t, vmZone+podZone)
	tr := &noNetwork{hits: map[string]int{}}
	h := proxy(t, splitJSON(srv.Addr, "random", []int{10, 90}, ""), tr)
	refresh := func() { resolved(t, h) }
	refresh()
	count := func(n int) (vm, pods int) {
		clear(tr.hits)
		for range n {
			if code := serve(h); code != 200 {
				t.Fatalf("status %d", code)
			}
		}
		for _, d := range podDials {
			pods += tr.hits[d]
		}
		return tr.hits[vmDials[0]], pods
	}
	if vm, pods := count(1000); vm == 0 || pods < 800 {
		t.Fatalf("before: vm %d, pods %d", vm, pods)
	}
	srv.MustSet(t, vmZone)
	refresh()
	if vm, pods := count(1000); vm != 1000 || pods != 0 {
		t.Fatalf("pods emptied: vm %d, pods %d; want all 1000 on the VM", vm, pods)
	}
	srv.MustSet(t, vmZone+podZone)
	refresh()
	if vm, pods := count(1000); vm == 0 || pods < 800 {
		t.Fatalf("pods back: vm %d, pods %d", vm, pods)
	}
}

// A backup (weight 0) serves only while the weighted Service has no usable
// endpoint; /headless/ says so (backup_in_use).
func TestSplitBackupOnly(t *testing.T) {
	vmZone, vmDials := zoneOf("vm", 1, 2)
	podZone, podDials := zoneOf("pods", 2, 3)
	srv := dnstest.Start(t, vmZone+podZone)
	tr := &noNetwork{hits: map[string]int{}}
	// pods primary, vm the backup.
	h := proxy(t, splitJSON(srv.Addr, "random", []int{0, 1}, ""), tr)
	src := resolved(t, h)
	onVM := func() int { return tr.hits[vmDials[0]] + tr.hits[vmDials[1]] }
	for range 500 {
		serve(h)
	}
	if onVM() != 0 {
		t.Fatalf("the backup got %d of 500 requests while the pods were there", onVM())
	}
	srv.MustSet(t, vmZone)
	if _, err := src.uses[1].watcher.RefreshNow(t.Context()); err != nil {
		t.Fatal(err)
	}
	for range 500 {
		if code := serve(h); code != 200 {
			t.Fatalf("status %d with the backup standing in", code)
		}
	}
	if onVM() != 500 {
		t.Fatalf("the backup got %d of 500 requests while the pods had none", onVM())
	}
	if st := statusOf(src.uses[0].watcher, 1); !st.Traffic.BackupInUse || st.Traffic.BackupRequests != 500 {
		t.Fatalf("status of the backup: %+v", st.Traffic)
	}
	m := scrapeSource(t, src)
	m.expect(t, `caddy_headless_backup_in_use{service="vm.bbs.svc.cluster.local:8080"}`, 1)
	m.expect(t, `caddy_headless_backup_requests_total{service="vm.bbs.svc.cluster.local:8080"}`, 500)
	m.expect(t, `caddy_headless_requests_total{service="vm.bbs.svc.cluster.local:8080"}`, 500)
	m.expect(t, `caddy_headless_requests_total{service="pods.bbs.svc.cluster.local:8080"}`, 500)
	srv.MustSet(t, vmZone+podZone)
	if _, err := src.uses[1].watcher.RefreshNow(t.Context()); err != nil {
		t.Fatal(err)
	}
	clear(tr.hits)
	for range 500 {
		serve(h)
	}
	pods := 0
	for _, d := range podDials {
		pods += tr.hits[d]
	}
	if onVM() != 0 || pods != 500 {
		t.Fatalf("pods back: backup %d, pods %d", onVM(), pods)
	}
	if st := statusOf(src.uses[0].watcher, 1); st.Traffic.BackupInUse {
		t.Fatalf("backup still in use: %+v", st.Traffic)
	}
	scrapeSource(t, src).expect(t, `caddy_headless_backup_in_use{service="vm.bbs.svc.cluster.local:8080"}`, 0)
}

// scrapeSource reads the metrics of src's watchers from a registry of
// their own.
func scrapeSource(t *testing.T, src *Headless) scrape {
	t.Helper()
	c := newServiceCollector()
	for _, u := range src.uses {
		c.add(u.key, u.watcher)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	for _, f := range families {
		if _, err := expfmt.MetricFamilyToText(&buf, f); err != nil {
			t.Fatal(err)
		}
	}
	return parseScrape(t, buf.Bytes())
}

// The JSON form is checked where Provision checks it (configs), with errors
// that name the field and the Services.
func TestSplitConfigErrors(t *testing.T) {
	w := func(n int) *int { return &n }
	svc := func(name string, weight *int) WeightedService { return WeightedService{Service: name, Weight: weight} }
	var many []WeightedService
	for i := range 17 {
		many = append(many, svc(fmt.Sprintf("s%d.bbs:80", i), nil))
	}
	for _, tc := range []struct {
		name string
		h    Headless
		want string // "" for none
	}{
		{"weighted", Headless{Services: []WeightedService{svc("vm.bbs:80", w(90)), svc("pods.bbs:80", w(10))}}, ""},
		{"backup", Headless{Services: []WeightedService{svc("vm.bbs:80", w(0)), svc("pods.bbs:80", w(1))}}, ""},
		{"no weights", Headless{Services: []WeightedService{svc("vm.bbs:80", nil), svc("pods.bbs:80", nil)}}, ""},
		{"all backups", Headless{Services: []WeightedService{svc("vm.bbs:80", w(0)), svc("pods.bbs:80", w(0))}}, "headless vm.bbs:80, pods.bbs:80: every weight is 0"},
		{"some weights", Headless{Services: []WeightedService{svc("vm.bbs:80", w(1)), svc("pods.bbs:80", nil)}}, "give a weight to every Service or to none (1 of 2 have one)"},
		{"negative", Headless{Services: []WeightedService{svc("vm.bbs:80", w(-1)), svc("pods.bbs:80", w(1))}}, "headless vm.bbs:80: weight must be 0 (a backup) or more, got -1"},
		{"huge", Headless{Services: []WeightedService{svc("vm.bbs:80", w(2_000_000)), svc("pods.bbs:80", w(1))}}, "weight must be at most 1000000"},
		{"twice", Headless{Services: []WeightedService{svc("vm.bbs:80", nil), svc("vm.bbs.svc.cluster.local:80", nil)}}, `vm.bbs.svc.cluster.local:80 is named twice (as "vm.bbs:80" and "vm.bbs.svc.cluster.local:80")`},
		{"both forms", Headless{Service: "x.bbs:80", Services: []WeightedService{svc("vm.bbs:80", nil)}}, "set service (one Service) or services (several), not both"},
		{"bad service", Headless{Services: []WeightedService{svc("vm.bbs", nil), svc("pods.bbs:80", nil)}}, "missing port"},
		{"17", Headless{Services: many}, "at most 16 services per source, got 17"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.h.configs(caddyfileEnv)
			if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("configs = %v, want %q", err, tc.want)
			}
		})
	}
}

// A retry may go to another Service: with the pods' one endpoint refusing
// every request and weighted 99, each request first tries the pod (99 %)
// and its retry (lb_retries 1) is handed both Services' endpoints, of which
// Caddy has marked the pod down (fail_duration): no request fails.
func TestSplitRetryCrossesServices(t *testing.T) {
	vmZone, vmDials := zoneOf("vm", 1, 1)
	podZone, podDials := zoneOf("pods", 2, 1)
	srv := dnstest.Start(t, vmZone+podZone)
	tr := &noNetwork{hits: map[string]int{}, down: func(d string) bool { return d == podDials[0] }}
	body := splitJSON(srv.Addr, "random", []int{1, 99}, "")
	body = strings.TrimSuffix(body, "}}") + `,"retries":1},"health_checks":{"passive":{"fail_duration":"1h","max_fails":1}}}`
	h := proxy(t, body, tr)
	resolved(t, h)
	for i := range 500 {
		if code := serve(h); code != 200 {
			t.Fatalf("request %d: status %d (hits %v)", i, code, tr.hits)
		}
	}
	if tr.hits[vmDials[0]] != 500 {
		t.Fatalf("the VM answered %d of 500 requests: %v", tr.hits[vmDials[0]], tr.hits)
	}
}

// A Service whose endpoints all fail their health checks gives its share
// to the others (real probes of real backends), and takes it back when one
// passes again.
func TestSplitUnhealthyServiceGivesShare(t *testing.T) {
	vmB, podB := newHealthBackend(t), newHealthBackend(t)
	zone := ""
	for name, b := range map[string]*healthBackend{"vm": vmB, "pods": podB} {
		ap := netip.MustParseAddrPort(b.dial)
		zone += fmt.Sprintf("_http._tcp.%s.bbs.svc.cluster.local. 5 IN SRV 0 50 %d %s-0.%s.bbs.svc.cluster.local.\n", name, ap.Port(), name, name)
		zone += fmt.Sprintf("%s-0.%s.bbs.svc.cluster.local. 5 IN A 127.0.0.1\n", name, name)
	}
	srv := dnstest.Start(t, zone)
	podB.status.Store(503)
	body := fmt.Sprintf(`{"dynamic_upstreams":{"source":"headless","services":[{"service":"vm.bbs:http","weight":10},{"service":"pods.bbs:http","weight":90}],`+
		`"resolvers":[%q],"versions":{"ipv4":true},"allow_addresses":["loopback"],"health_checks":{"interval":"1s"}}}`, srv.Addr)
	h := proxy(t, body, &noNetwork{})
	src := resolved(t, h)
	side := func() (vm, pods int) {
		for range 200 {
			ups, err := src.GetUpstreams(httptest.NewRequest("GET", "http://app.example/", nil))
			if err != nil {
				t.Fatal(err)
			}
			if ups[0].Dial == vmB.dial {
				vm++
			} else {
				pods++
			}
		}
		return vm, pods
	}
	poll.Until(t, "the pods' endpoint found unhealthy", func() bool {
		st, ok := healthOf(src.uses[1].watcher, podB.dial)
		return ok && st.State.String() == "unhealthy"
	})
	if vm, pods := side(); vm != 200 || pods != 0 {
		t.Fatalf("pods unhealthy: vm %d, pods %d; want all 200 on the VM", vm, pods)
	}
	podB.status.Store(200)
	poll.Until(t, "the pods take their share again", func() bool { _, pods := side(); return pods > 100 })
}
