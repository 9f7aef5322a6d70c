package integration

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// convergence collects the measured times of TestScaleOutIn, printed at the
// end of the run.
var (
	convergenceMu sync.Mutex
	convergence   []string
)

func recordConvergence(t *testing.T, what string, d time.Duration) {
	t.Logf("CONVERGENCE %s: %v (bound %v)", what, d.Round(time.Millisecond), convergeBound)
	convergenceMu.Lock()
	convergence = append(convergence, fmt.Sprintf("%-55s %8v", what, d.Round(time.Millisecond)))
	convergenceMu.Unlock()
}

// proxyTo is a headless_proxy directive for a service, with extra lines for
// the headless options and for the reverse_proxy subdirectives.
func (s *suite) proxyTo(matcher, ref, sourceExtra, proxyExtra string) string {
	if matcher != "" {
		matcher += " "
	}
	return fmt.Sprintf(`	headless_proxy %s%s {
		%s
		%s
		lb_policy round_robin
		header_up X-Real-IP {remote_host}
		%s
	}
`, matcher, ref, s.headlessOpts(), sourceExtra, proxyExtra)
}

// reverseProxyTo is proxyTo written the long way: reverse_proxy with the
// `dynamic headless` upstream source.
func (s *suite) reverseProxyTo(matcher, ref, sourceExtra, proxyExtra string) string {
	if matcher != "" {
		matcher += " "
	}
	return fmt.Sprintf(`	reverse_proxy %s{
		dynamic headless %s {
			%s
			%s
		}
		lb_policy round_robin
		header_up X-Real-IP {remote_host}
		%s
	}
`, matcher, ref, s.headlessOpts(), sourceExtra, proxyExtra)
}

// handleProxy is reverseProxyTo inside `handle <path>`.
func (s *suite) handleProxy(path, ref, sourceExtra string) string {
	return fmt.Sprintf("\thandle %s {\n%s\t}\n", path, s.reverseProxyTo("", ref, sourceExtra, ""))
}

// storyBackends publishes the story's two VMs as the headless Services
// frontend.bbs (port 8001) and backend.bbs (port http, 8004).
func (s *suite) storyBackends(t *testing.T) (ui, api *vm) {
	t.Helper()
	vms := s.useVMs(t, 1, 2)
	ui, api = vms[0], vms[1]
	s.namespace(t, "bbs")
	s.apply(t,
		headlessService("bbs", "frontend", map[string]int{"http": 8001}),
		endpointSlice("bbs", "frontend", "frontend-1", "IPv4", map[string]int{"http": 8001}, endpoint{addr: ui.v4, ready: true}),
		headlessService("bbs", "backend", map[string]int{"http": 8004}),
		endpointSlice("bbs", "backend", "backend-1", "IPv4", map[string]int{"http": 8004}, endpoint{addr: api.v4, ready: true}),
	)
	return ui, api
}

// TestStory is the story of docs/design.md: a UI VM and an API VM published as
// headless Services without selectors, routed by path over HTTPS with a
// certificate from the ACME CA, with the forwarding headers nginx used to set.
func TestStory(t *testing.T) {
	s := requireSuite(t)
	ui, api := s.storyBackends(t)
	// The project's own Caddyfile.example, behind the suite's global
	// options; it takes the resolver from $HEADLESS_OPTIONS. Storage of its
	// own, so that this Caddy obtains a certificate rather than loading one
	// another scenario obtained.
	example, err := os.ReadFile(filepath.Join("..", "Caddyfile.example"))
	if err != nil {
		t.Fatalf("the story is Caddyfile.example: %v", err)
	}
	if !strings.Contains(string(example), site+" {") {
		t.Fatalf("Caddyfile.example has no site block %q", site)
	}
	c := s.startCaddyWith(t, filepath.Join(s.dir, "story-storage"),
		[]string{"HEADLESS_OPTIONS=" + s.headlessOpts()}, string(example))
	cl := s.client()

	// The certificate: the client trusts only Pebble's root, and Caddy's log
	// says it obtained the certificate (real HTTP-01 or TLS-ALPN-01
	// validation, PEBBLE_VA_ALWAYS_VALID is unset).
	r, err := s.get(cl, "/")
	if err != nil {
		t.Fatalf("GET /: %v", err)
	}
	if r.status != http.StatusOK {
		t.Fatalf("GET /: %d %q", r.status, r.body)
	}
	if err := s.pebbleIssued(r.tls); err != nil {
		t.Fatalf("certificate for %s does not chain to Pebble's root: %v", site, err)
	}
	if issuer := r.tls.PeerCertificates[0].Issuer.CommonName; !strings.Contains(issuer, "Pebble") {
		t.Errorf("certificate issuer = %q, want Pebble's intermediate", issuer)
	}
	if lines := c.logLines("certificate obtained successfully", site); len(lines) == 0 {
		t.Errorf("Caddy's log does not say it obtained a certificate for %s", site)
	} else {
		t.Logf("Caddy: %s", lines[0])
	}

	cases := []struct {
		path string
		vm   *vm
		port string
	}{
		{"/", ui, "8001"},
		{"/index.html", ui, "8001"},
		{"/static/app.js", ui, "8001"},
		{"/apiary", ui, "8001"}, // not /api
		{"/api", api, "8004"},
		{"/api/v1/posts", api, "8004"},
		{"/signin", api, "8004"},
		{"/signin/oauth", api, "8004"},
		{"/signout", api, "8004"},
		{"/signout/now", api, "8004"},
	}
	for _, tc := range cases {
		got := s.mustGet(t, cl, tc.path)
		want := net.JoinHostPort(tc.vm.v4, tc.port)
		if got.VM != tc.vm.name || got.Local != want || got.Path != tc.path {
			t.Errorf("GET %s: answered by %s at %s for path %q, want %s at %s for %q", tc.path, got.VM, got.Local, got.Path, tc.vm.name, want, tc.path)
		}
		if got.XForwardedFor != "127.0.0.1" || got.XRealIP != "127.0.0.1" {
			t.Errorf("GET %s: X-Forwarded-For %q, X-Real-IP %q; want the client's address 127.0.0.1 in both", tc.path, got.XForwardedFor, got.XRealIP)
		}
		if got.XForwardedProt != "https" || got.XForwardedHost != site || got.Host != site {
			t.Errorf("GET %s: X-Forwarded-Proto %q, X-Forwarded-Host %q, Host %q; want https, %s, %s", tc.path, got.XForwardedProt, got.XForwardedHost, got.Host, site, site)
		}
	}

	// Plain HTTP is redirected to HTTPS, as automatic HTTPS does.
	req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/signin", s.httpPort), nil)
	req.Host = site
	noFollow := &http.Client{Timeout: 5 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noFollow.Do(req)
	if err != nil {
		t.Fatalf("GET http://%s/signin: %v", site, err)
	}
	resp.Body.Close()
	if loc := resp.Header.Get("Location"); resp.StatusCode != http.StatusPermanentRedirect || !strings.HasPrefix(loc, "https://"+site) {
		t.Errorf("GET http://%s/signin: %d to %q, want 308 to https://%s…", site, resp.StatusCode, loc, site)
	}
}

// TestScaleOutIn changes a Service's endpoints with kubectl and measures how
// long Caddy takes to send traffic to a new endpoint and to stop sending it
// to a removed one. No request may fail meanwhile (removed VMs keep running).
func TestScaleOutIn(t *testing.T) {
	s := requireSuite(t)
	vms := s.useVMs(t, 1, 2, 3, 4, 5)
	ports := map[string]int{"http": 8080}
	s.namespace(t, "scale")
	slice := func(vs ...*vm) string {
		var eps []endpoint
		for _, v := range vs {
			eps = append(eps, endpoint{addr: v.v4, ready: true})
		}
		return endpointSlice("scale", "web", "web-1", "IPv4", ports, eps...)
	}
	s.apply(t, headlessService("scale", "web", ports), slice(vms[0], vms[1]))
	s.startCaddy(t, s.proxyTo("", "web.scale:8080", "", ""))
	cl := s.client()

	assertSet(t, s.spread(t, cl, "/", 20), "vm1", "vm2")

	steps := []struct {
		what string
		set  []*vm
		want []string
	}{
		{"scale out 2→3 (vm3 added)", []*vm{vms[0], vms[1], vms[2]}, []string{"vm1", "vm2", "vm3"}},
		{"scale out 3→5 (vm4, vm5 added)", vms, []string{"vm1", "vm2", "vm3", "vm4", "vm5"}},
		{"scale in 5→4 (vm1 removed)", vms[1:], []string{"vm2", "vm3", "vm4", "vm5"}},
		{"scale in 4→2 (vm2, vm3 removed)", vms[3:], []string{"vm4", "vm5"}},
	}
	for _, st := range steps {
		s.apply(t, slice(st.set...))
		d := s.converge(t, cl, "/", st.want)
		recordConvergence(t, st.what, d)
	}
}

// converge sends requests to path until the set of VMs answering is exactly
// want, and returns how long that took. "Exactly" means: every VM of want
// answered since the last answer from a VM outside want, and no VM outside
// want answered for the last 2·len(want)+10 requests and 2·refreshMax.
// Every request must succeed.
func (s *suite) converge(t *testing.T, cl *http.Client, path string, want []string) time.Duration {
	t.Helper()
	wanted := map[string]bool{}
	for _, w := range want {
		wanted[w] = true
	}
	start := time.Now()
	deadline := start.Add(convergeBound + 2*refreshMax)
	var lastStray time.Time // last answer from a VM not in want
	seen := map[string]time.Time{}
	n := 0 // requests since the last stray answer
	for {
		if time.Now().After(deadline) {
			t.Fatalf("after %v, the VMs answering %s are not exactly %v: seen since last stray answer %v, last stray answer %v ago",
				time.Since(start).Round(time.Millisecond), path, want, keys(seen), time.Since(lastStray).Round(time.Millisecond))
		}
		r := s.mustGet(t, cl, path)
		now := time.Now()
		if !wanted[r.VM] {
			lastStray = now
			seen = map[string]time.Time{}
			n = 0
			continue
		}
		n++
		if _, ok := seen[r.VM]; !ok {
			seen[r.VM] = now
		}
		if len(seen) == len(want) && n >= 2*len(want)+10 && now.Sub(lastStray) >= 2*refreshMax && now.Sub(start) >= 2*refreshMax {
			// Converged when the last stray answer was given and the
			// last wanted VM was first seen.
			at := lastStray
			for _, ts := range seen {
				if ts.After(at) {
					at = ts
				}
			}
			d := at.Sub(start)
			if d < 0 {
				d = 0
			}
			if d > convergeBound {
				t.Fatalf("the VMs answering %s became %v after %v, more than the bound %v", path, want, d, convergeBound)
			}
			return d
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func keys(m map[string]time.Time) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// assertSet fails unless exactly the VMs named answered.
func assertSet(t *testing.T, seen map[string]int, want ...string) {
	t.Helper()
	ok := len(seen) == len(want)
	for _, w := range want {
		if seen[w] == 0 {
			ok = false
		}
	}
	if !ok {
		t.Fatalf("answers per VM %v, want exactly %v", seen, want)
	}
}

// TestReadiness marks endpoints ready: false in the EndpointSlice: they stop
// getting traffic; with none ready Caddy answers 502/503 and logs an error
// naming the service; back to ready, traffic resumes.
func TestReadiness(t *testing.T) {
	s := requireSuite(t)
	vms := s.useVMs(t, 1, 2)
	ports := map[string]int{"http": 8080}
	s.namespace(t, "readiness")
	slice := func(r1, r2 bool) string {
		return endpointSlice("readiness", "app", "app-1", "IPv4", ports,
			endpoint{addr: vms[0].v4, ready: r1}, endpoint{addr: vms[1].v4, ready: r2})
	}
	s.apply(t, headlessService("readiness", "app", ports), slice(true, true))
	c := s.startCaddy(t, s.proxyTo("", "app.readiness:8080", "", ""))
	cl := s.client()
	assertSet(t, s.spread(t, cl, "/", 20), "vm1", "vm2")

	s.apply(t, slice(true, false))
	d := s.converge(t, cl, "/", []string{"vm1"})
	t.Logf("vm2 ready: false → out of rotation after %v", d.Round(time.Millisecond))

	// None ready: CoreDNS answers NXDOMAIN, the endpoint set is empty.
	s.apply(t, slice(false, false))
	start := time.Now()
	var last response
	err := waitFor(convergeBound, 50*time.Millisecond, func() error {
		r, err := s.get(cl, "/")
		if err != nil {
			return err
		}
		last = r
		if r.status != http.StatusBadGateway && r.status != http.StatusServiceUnavailable {
			return fmt.Errorf("got %d from %q", r.status, r.reply.VM)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("with no endpoint ready, want 502 or 503: %v", err)
	}
	t.Logf("no endpoint ready → %d after %v", last.status, time.Since(start).Round(time.Millisecond))
	// The answer stays an error while nothing is ready.
	for range 10 {
		r, err := s.get(cl, "/")
		if err != nil {
			t.Fatal(err)
		}
		if r.status != http.StatusBadGateway && r.status != http.StatusServiceUnavailable {
			t.Fatalf("with no endpoint ready, GET / answered %d by %q", r.status, r.reply.VM)
		}
	}
	if lines := c.logLines(`"error"`, "app.readiness"); len(lines) == 0 {
		t.Errorf("with no endpoint ready, Caddy's log has no error naming the service app.readiness")
	} else {
		t.Logf("Caddy logged: %s", lines[len(lines)-1])
	}

	// Back to ready: errors are expected until the next refresh, then
	// every request must succeed again.
	s.apply(t, slice(true, true))
	start = time.Now()
	if err := waitFor(convergeBound, 50*time.Millisecond, func() error {
		r, err := s.get(cl, "/")
		if err != nil {
			return err
		}
		if r.status != http.StatusOK || r.reply.VM == "" {
			return fmt.Errorf("got %d: %q", r.status, r.body)
		}
		return nil
	}); err != nil {
		t.Fatalf("endpoints ready again, but traffic did not resume: %v", err)
	}
	t.Logf("ready again → first answer after %v", time.Since(start).Round(time.Millisecond))
	d = s.converge(t, cl, "/", []string{"vm1", "vm2"})
	t.Logf("ready again → traffic to both after %v more", d.Round(time.Millisecond))
}

// TestStatefulSetSRVDualStack covers StatefulSet-style hostnames with a
// per-pod name, SRV named ports against numeric ports, and a dual-stack
// Service (an IPv4 and an IPv6 EndpointSlice).
func TestStatefulSetSRVDualStack(t *testing.T) {
	s := requireSuite(t)
	vms := s.useVMs(t, 3, 4)
	ports := map[string]int{"pg": 5432, "web": 8080}
	s.namespace(t, "sts")
	s.apply(t,
		headlessService("sts", "db", ports),
		endpointSlice("sts", "db", "db-v4", "IPv4", ports,
			endpoint{addr: vms[0].v4, hostname: "db-0", ready: true},
			endpoint{addr: vms[1].v4, hostname: "db-1", ready: true}),
		endpointSlice("sts", "db", "db-v6", "IPv6", ports,
			endpoint{addr: vms[0].v6, hostname: "db-0", ready: true},
			endpoint{addr: vms[1].v6, hostname: "db-1", ready: true}),
	)
	both := "versions ipv4 ipv6"
	s.startCaddy(t,
		s.handleProxy("/pod0/*", "db-0.db.sts.svc.cluster.local:5432", both)+
			s.handleProxy("/srv-pg/*", "db.sts:pg", both)+
			s.handleProxy("/srv-web/*", "db.sts:web", both)+
			s.handleProxy("/num/*", "db.sts:8080", "versions ipv4")+
			s.handleProxy("/v6/*", "db.sts:8080", "versions ipv6")+
			s.handleProxy("/dual/*", "db.sts:8080", both))
	cl := s.client()

	v4 := map[string]bool{vms[0].v4: true, vms[1].v4: true}
	v6 := map[string]bool{vms[0].v6: true, vms[1].v6: true}
	type check struct {
		path     string
		vms      []string
		port     string
		families []string // "4", "6": which families must be seen
	}
	checks := []check{
		// The per-pod name reaches that pod only, over both families.
		{"/pod0/x", []string{"vm3"}, "5432", []string{"4", "6"}},
		// SRV: the port comes from the records, not from the reference.
		{"/srv-pg/x", []string{"vm3", "vm4"}, "5432", []string{"4", "6"}},
		{"/srv-web/x", []string{"vm3", "vm4"}, "8080", []string{"4", "6"}},
		// Numeric port: A (and AAAA) records plus that port.
		{"/num/x", []string{"vm3", "vm4"}, "8080", []string{"4"}},
		{"/v6/x", []string{"vm3", "vm4"}, "8080", []string{"6"}},
		{"/dual/x", []string{"vm3", "vm4"}, "8080", []string{"4", "6"}},
	}
	for _, ck := range checks {
		seenVM := map[string]int{}
		fam := map[string]int{}
		for range 24 {
			r := s.mustGet(t, cl, ck.path)
			host, port, err := net.SplitHostPort(r.Local)
			if err != nil {
				t.Fatalf("GET %s: VM reported local address %q: %v", ck.path, r.Local, err)
			}
			if port != ck.port {
				t.Errorf("GET %s: reached %s at port %s, want %s", ck.path, r.VM, port, ck.port)
			}
			switch {
			case v4[host]:
				fam["4"]++
			case v6[host]:
				fam["6"]++
			default:
				t.Errorf("GET %s: reached %s at %s, not one of the Service's addresses", ck.path, r.VM, r.Local)
			}
			seenVM[r.VM]++
		}
		assertSet(t, seenVM, ck.vms...)
		if len(fam) != len(ck.families) {
			t.Errorf("GET %s: address families seen %v, want exactly %v", ck.path, fam, ck.families)
		}
		for _, f := range ck.families {
			if fam[f] == 0 {
				t.Errorf("GET %s: no request reached an IPv%s address (families seen %v)", ck.path, f, fam)
			}
		}
		t.Logf("GET %s: VMs %v, address families %v", ck.path, seenVM, fam)
	}
}

// TestDNSOutage stops CoreDNS for 15 s under steady requests: Caddy keeps the
// last good endpoints, so no request fails; after CoreDNS is back, changes
// are followed again.
func TestDNSOutage(t *testing.T) {
	s := requireSuite(t)
	vms := s.useVMs(t, 1, 2, 3)
	ports := map[string]int{"http": 8080}
	s.namespace(t, "outage")
	slice := func(vs ...*vm) string {
		var eps []endpoint
		for _, v := range vs {
			eps = append(eps, endpoint{addr: v.v4, ready: true})
		}
		return endpointSlice("outage", "app", "app-1", "IPv4", ports, eps...)
	}
	s.apply(t, headlessService("outage", "app", ports), slice(vms[0], vms[1]))
	c := s.startCaddy(t, s.proxyTo("", "app.outage:8080", "", ""))
	cl := s.client()
	assertSet(t, s.spread(t, cl, "/", 20), "vm1", "vm2")

	t.Cleanup(func() {
		if s.coredns.exited() {
			if err := s.runCoreDNS(); err != nil {
				t.Errorf("restarting CoreDNS: %v", err)
			}
		}
	})
	l := s.startLoad(cl, "/", 2)
	time.Sleep(time.Second)
	s.coredns.stop()
	t.Logf("CoreDNS stopped at %s", time.Now().Format("15:04:05.000"))
	time.Sleep(15 * time.Second)
	if err := s.runCoreDNS(); err != nil {
		l.end(t, "during the DNS outage")
		t.Fatalf("restarting CoreDNS: %v", err)
	}
	t.Logf("CoreDNS back at %s", time.Now().Format("15:04:05.000"))
	time.Sleep(2 * refreshMax)
	l.end(t, "15 s DNS outage")
	// Caddy must have noticed the outage, or this proved nothing.
	noticed := 0
	for _, line := range c.logLines("app.outage") {
		if strings.Contains(line, `"level":"warn"`) || strings.Contains(line, `"level":"error"`) {
			noticed++
		}
	}
	if noticed == 0 {
		t.Errorf("Caddy's log has no warning or error about app.outage: did it query DNS during the outage?")
	}
	if l.perVM["vm1"] == 0 || l.perVM["vm2"] == 0 {
		t.Errorf("during the outage, answers per VM %v: want both vm1 and vm2", l.perVM)
	}

	// Recovery: a change made after the outage is followed.
	s.apply(t, slice(vms[1], vms[2]))
	d := s.converge(t, cl, "/", []string{"vm2", "vm3"})
	t.Logf("after the outage, endpoint change followed in %v", d.Round(time.Millisecond))
}

// TestReload posts a changed Caddyfile to the admin API's /load 20 times
// under steady requests: no request fails, each config takes effect, and
// Caddy's goroutine count returns to its baseline (watchers are handed over,
// not leaked).
func TestReload(t *testing.T) {
	s := requireSuite(t)
	s.useVMs(t, 1, 2)
	ports := map[string]int{"http": 8080}
	s.namespace(t, "reload")
	s.apply(t, headlessService("reload", "app", ports),
		endpointSlice("reload", "app", "app-1", "IPv4", ports,
			endpoint{addr: s.vms[0].v4, ready: true}, endpoint{addr: s.vms[1].v4, ready: true}))
	// The first half of the reloads alternates the form (headless_proxy,
	// reverse_proxy with dynamic headless) with the same headless options:
	// the new config must take over the running watcher. The second half
	// also alternates an option that makes a watcher of its own, so watchers
	// are started and stopped.
	const reloads = 20
	body := func(gen int) string {
		proxy, extra := s.proxyTo, ""
		if gen%2 == 1 {
			proxy = s.reverseProxyTo
			if gen > reloads/2 {
				extra = "dial_timeout 3s"
			}
		}
		// Idle upstream connections of a replaced config's transport live
		// until their keep-alive timeout (Caddy's default is 2 minutes); a
		// short one lets them go within the wait below, so that what
		// remains above the baseline is a real leak.
		return fmt.Sprintf("\theader X-Config-Generation %d\n%s", gen, proxy("", "app.reload:8080", extra, "transport http {\n\t\t\tkeepalive 2s\n\t\t}"))
	}
	c := s.startCaddy(t, body(0))
	cl := s.client()
	assertSet(t, s.spread(t, cl, "/", 20), "vm1", "vm2")

	// Baseline: after the same steady traffic the reloads run under, with
	// the client's connections closed.
	warm := s.startLoad(cl, "/", 2)
	time.Sleep(2 * time.Second)
	warm.end(t, "warm-up")
	baseline := s.settledGoroutines(t, c, cl)
	t.Logf("goroutine baseline: %d", baseline)

	changed := func() int { return len(c.logLines("endpoints changed", "app.reload")) }
	before := changed()
	// Now and then, at the moment Caddy replaces its server, a request gets
	// no HTTP answer at all: the connection closes (EOF). That is Caddy's
	// own server handover, not the upstream source: on Linux each config
	// binds its own SO_REUSEPORT socket, and connections still queued on
	// the old one when it closes are reset. With static upstreams instead
	// of this plugin the same loop shows the same EOFs (3 runs of 10,
	// against 2 of 10 with the plugin, 1-2 requests each). Such a request
	// is sent once more, as a browser does, and must then succeed; every
	// answer Caddy does give must be a 200 from a VM (an upstream error,
	// 502 or 503, fails the test).
	l := s.startLoadRetry(cl, "/", 2, true)
	for gen := 1; gen <= reloads; gen++ {
		if err := c.load(body(gen)); err != nil {
			l.end(t, "reloads")
			t.Fatalf("reload %d: %v", gen, err)
		}
		time.Sleep(300 * time.Millisecond)
		if gen == reloads/2 {
			if n := changed() - before; n != 0 {
				t.Errorf("%d reloads with the same headless options logged %d endpoint changes for app.reload: the new config did not take over the running watcher but resolved afresh", gen, n)
			}
		}
	}
	time.Sleep(time.Second)
	l.end(t, fmt.Sprintf("%d reloads via POST /load", reloads))
	t.Logf("endpoint-change log lines for app.reload: %d before the reloads, %d after", before, changed())

	// A new connection: one that a replaced server accepted just before
	// it stopped can stay with that server while it is kept busy.
	r, err := s.get(s.client(), "/")
	if err != nil {
		t.Fatal(err)
	}
	if g := r.header.Get("X-Config-Generation"); g != fmt.Sprint(reloads) {
		t.Fatalf("after %d reloads, X-Config-Generation = %q: the last config is not in effect", reloads, g)
	}

	// A leak of one goroutine per reload would leave 20 more; allow for
	// idle connections that come and go.
	const slack = reloads / 2
	var after int
	err = waitFor(30*time.Second, time.Second, func() error {
		after = s.settledGoroutines(t, c, cl)
		if after > baseline+slack {
			return fmt.Errorf("%d goroutines, baseline %d", after, baseline)
		}
		return nil
	})
	t.Logf("goroutines: baseline %d, after %d reloads %d", baseline, reloads, after)
	if err != nil {
		t.Fatalf("Caddy's goroutine count did not return to its baseline (+%d) after %d reloads: %v\n%s", slack, reloads, err, c.goroutineDump())
	}
}

// settledGoroutines closes the client's idle connections and reads Caddy's
// goroutine count once the server side has let go of them.
func (s *suite) settledGoroutines(t *testing.T, c *caddy, cl *http.Client) int {
	t.Helper()
	cl.CloseIdleConnections()
	time.Sleep(500 * time.Millisecond)
	n, err := c.goroutines()
	if err != nil {
		t.Fatalf("reading Caddy's goroutines: %v", err)
	}
	return n
}
