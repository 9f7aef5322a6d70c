package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// `via api` on the suite's kube-apiserver in RBAC mode, as a service
// account bound to exactly the Role of deploy/overlays/via-api (read from
// the overlay, so it cannot drift): convergence beside via dns, drain of a
// terminating endpoint, the terminating fallback, an apiserver restart
// under a request loop.

const viaAPINS, viaAPIAccountNS = "viaapi", "caddy-viaapi"

// viaAPIToken applies the overlay's Role and RoleBinding for ns, bound to
// the service account caddy of saNS, and returns a file with its token.
func (s *suite) viaAPIToken(t *testing.T, ns, saNS string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(deployDir("overlays/via-api"), "endpointslices-rbac.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	rbac := strings.NewReplacer("namespace: bbs", "namespace: "+ns, "namespace: caddy-system", "namespace: "+saNS).Replace(string(b))
	if strings.Contains(rbac, "ClusterRole") || !strings.Contains(rbac, "verbs: [list, watch]") {
		t.Fatalf("the overlay's RBAC must be list and watch in namespaces only:\n%s", rbac)
	}
	s.apply(t,
		fmt.Sprintf("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s\n", ns),
		fmt.Sprintf("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s\n", saNS),
		fmt.Sprintf("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: caddy\n  namespace: %s\n", saNS))
	s.apply(t, strings.Split(rbac, "\n---\n")...)
	tok := s.kubectl(t, "-n", saNS, "create", "token", "caddy", "--duration=2h")
	f := filepath.Join(s.dir, "token-"+saNS)
	if err := os.WriteFile(f, []byte(strings.TrimSpace(tok)), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// condEndpoint is an EndpointSlice endpoint with all three conditions.
type condEndpoint struct {
	addr                        string
	ready, serving, terminating bool
}

func ready(addr string) condEndpoint    { return condEndpoint{addr, true, true, false} }
func draining(addr string) condEndpoint { return condEndpoint{addr, false, true, true} }

func condSlice(ns, svc, name string, port int, eps ...condEndpoint) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: %s\n  namespace: %s\n  labels:\n    kubernetes.io/service-name: %s\naddressType: IPv4\nports:\n- name: http\n  port: %d\n  protocol: TCP\n", name, ns, svc, port)
	if len(eps) == 0 {
		b.WriteString("endpoints: []\n")
	} else {
		b.WriteString("endpoints:\n")
	}
	for _, e := range eps {
		fmt.Fprintf(&b, "- addresses: [%q]\n  conditions:\n    ready: %t\n    serving: %t\n    terminating: %t\n", e.addr, e.ready, e.serving, e.terminating)
	}
	return b.String()
}

func percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

func TestViaAPI(t *testing.T) {
	s := requireSuite(t)
	vms := s.useVMs(t, 1, 2, 3)
	token := s.viaAPIToken(t, viaAPINS, viaAPIAccountNS)
	const svc, port = "web", 8080
	ports := map[string]int{"http": port}
	s.apply(t, headlessService(viaAPINS, svc, ports), condSlice(viaAPINS, svc, "web-1", port, ready(vms[0].v4)))
	ref := fmt.Sprintf("%s.%s:%d", svc, viaAPINS, port)
	// Behind the node-local cache, a change is seen when the cache's entry
	// expires: up to 30 s. Its convergence is measured on cachedServices
	// Services at once, so that 50 changes take minutes, not 25.
	cache := s.startNodeLocalCache(t)
	var cachedRoutes strings.Builder
	for i := range cachedServices {
		name := fmt.Sprintf("conv-%d", i)
		s.apply(t, headlessService(viaAPINS, name, ports), condSlice(viaAPINS, name, name, port, ready(vms[0].v4)))
		fmt.Fprintf(&cachedRoutes, "\thandle /cached/%[1]s/* {\n\t\theadless_proxy %[1]s.%[2]s:%[3]d {\n\t\t\tresolvers %[4]s\n\t\t}\n\t}\n",
			name, viaAPINS, port, cache)
	}
	// Shapes checked through the admin API only (no request goes to their
	// addresses): 1,000 endpoints over 10 slices, a dual-stack Service, a
	// Service without slices.
	for _, name := range []string{"big", "dual", "ghost"} {
		fmt.Fprintf(&cachedRoutes, "\thandle /%[1]s/* {\n\t\theadless_proxy %[1]s.%[2]s:%[3]d {\n\t\t\tvia api {\n\t\t\t\tendpoint %[4]s\n\t\t\t\tca_file %[5]s\n\t\t\t\ttoken_file %[6]s\n\t\t\t}\n\t\t}\n\t}\n",
			name, viaAPINS, port, s.apiURL, s.caFile, token)
	}
	c := s.startCaddy(t, cachedRoutes.String()+fmt.Sprintf(`	handle /api/* {
		headless_proxy %[1]s {
			via api {
				endpoint %[2]s
				ca_file %[3]s
				token_file %[4]s
			}
		}
	}
	handle /dns/* {
		headless_proxy %[1]s {
			resolvers %[5]s
		}
	}
`, ref, s.apiURL, s.caFile, token, s.dnsAddr()))
	cl := s.client()
	answeredBy := func(path, want string) bool {
		r, err := s.get(cl, path)
		return err == nil && r.status == http.StatusOK && r.reply.VM == want
	}
	if err := waitFor(20*time.Second, 50*time.Millisecond, func() error {
		if !answeredBy("/api/", vms[0].name) || !answeredBy("/dns/", vms[0].name) {
			return fmt.Errorf("not answered by %s yet", vms[0].name)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	t.Run("Convergence", func(t *testing.T) {
		// From `kubectl apply` returning to a request answered by the new
		// set (one endpoint, so every request after that goes there).
		const changes = 50
		cached := make(chan []time.Duration, 1)
		go func() { cached <- s.convergeBehindCache(t, vms, changes, answeredBy) }()
		var viaAPI, viaDNS []time.Duration
		for i := range changes {
			to := vms[(i+1)%2]
			s.apply(t, condSlice(viaAPINS, svc, "web-1", port, ready(to.v4)))
			applied := time.Now()
			for !answeredBy("/api/", to.name) {
				if time.Since(applied) > 30*time.Second {
					t.Fatalf("change %d: via api never reached %s", i, to.name)
				}
				time.Sleep(2 * time.Millisecond)
			}
			viaAPI = append(viaAPI, time.Since(applied))
			for !answeredBy("/dns/", to.name) {
				if time.Since(applied) > 30*time.Second {
					t.Fatalf("change %d: via dns never reached %s", i, to.name)
				}
				time.Sleep(2 * time.Millisecond)
			}
			viaDNS = append(viaDNS, time.Since(applied))
		}
		viaCache := <-cached
		t.Logf("convergence over %d changes: via api p50 %v p99 %v; via dns (direct CoreDNS ttl 30, refresh 1s) p50 %v p99 %v; via dns behind the node-local cache (%d changes) p50 %v p99 %v",
			changes, percentile(viaAPI, .5).Round(time.Millisecond), percentile(viaAPI, .99).Round(time.Millisecond),
			percentile(viaDNS, .5).Round(time.Millisecond), percentile(viaDNS, .99).Round(time.Millisecond),
			len(viaCache), percentile(viaCache, .5).Round(time.Millisecond), percentile(viaCache, .99).Round(time.Millisecond))
		if len(viaCache) < changes {
			t.Errorf("behind the cache: %d changes converged, want %d", len(viaCache), changes)
		}
	})

	t.Run("Shapes", func(t *testing.T) {
		var manifests []string
		var want []string
		manifests = append(manifests, headlessService(viaAPINS, "big", ports), headlessService(viaAPINS, "dual", ports), headlessService(viaAPINS, "ghost", ports))
		for sl := range 10 {
			var eps []endpoint
			for i := range 100 {
				addr := fmt.Sprintf("10.231.%d.%d", 200+sl, i+1)
				eps = append(eps, endpoint{addr: addr, ready: true})
				want = append(want, fmt.Sprintf("%s:%d", addr, port))
			}
			manifests = append(manifests, endpointSlice(viaAPINS, "big", fmt.Sprintf("big-%d", sl), "IPv4", ports, eps...))
		}
		manifests = append(manifests,
			endpointSlice(viaAPINS, "dual", "dual-v4", "IPv4", ports, endpoint{addr: "10.231.210.1", ready: true}),
			endpointSlice(viaAPINS, "dual", "dual-v6", "IPv6", ports, endpoint{addr: "fd00:231::1", ready: true}))
		s.apply(t, manifests...)
		slices.Sort(want) // the addresses above sort the same as text and as IPs
		status := func(svc string) (st apiShape) {
			if err := getJSONInto(c.admin+"/headless/"+svc+"."+viaAPINS+".svc.cluster.local:8080", &st); err != nil {
				t.Fatal(err)
			}
			if len(st) != 1 {
				t.Fatalf("GET /headless/ for %s: %d watchers, want 1", svc, len(st))
			}
			return st
		}
		if err := waitFor(20*time.Second, 100*time.Millisecond, func() error {
			st := status("big")
			if len(st[0].Endpoints) != 1000 {
				return fmt.Errorf("big: %d endpoints, want 1,000", len(st[0].Endpoints))
			}
			var got []string
			for _, e := range st[0].Endpoints {
				got = append(got, e.Address)
			}
			slices.Sort(got)
			if !slices.Equal(got, want) {
				return fmt.Errorf("big: the 1,000 endpoints are not every address of the 10 slices once")
			}
			return nil
		}); err != nil {
			t.Error(err)
		}
		if err := waitFor(20*time.Second, 100*time.Millisecond, func() error {
			st := status("dual")
			var got []string
			for _, e := range st[0].Endpoints {
				got = append(got, e.Address)
			}
			if !slices.Equal(got, []string{"10.231.210.1:8080", "[fd00:231::1]:8080"}) {
				return fmt.Errorf("dual: endpoints %v, want both families", got)
			}
			return nil
		}); err != nil {
			t.Error(err)
		}
		// No slice: "no endpoints" (NXDOMAIN's meaning), and a request fails
		// with an error naming the Service and its namespace. It has no
		// address, so the request goes nowhere.
		if err := waitFor(20*time.Second, 100*time.Millisecond, func() error {
			st := status("ghost")
			if len(st[0].Endpoints) != 0 || st[0].Status != "empty" || st[0].Outcome != "nxdomain" {
				return fmt.Errorf("ghost: endpoints %d, status %q, outcome %q: want none, empty, nxdomain", len(st[0].Endpoints), st[0].Status, st[0].Outcome)
			}
			return nil
		}); err != nil {
			t.Error(err)
		}
		if r, err := s.get(cl, "/ghost/"); err != nil || r.status < 500 {
			t.Errorf("a request to the Service without slices: %v %d, want a 5xx", err, r.status)
		}
		if err := waitFor(5*time.Second, 100*time.Millisecond, func() error {
			if len(c.logLines("kubernetes.io/service-name=ghost in namespace "+viaAPINS)) == 0 {
				return fmt.Errorf("no error in Caddy's log naming ghost and its namespace")
			}
			return nil
		}); err != nil {
			t.Error(err)
		}
	})

	t.Run("Drain", func(t *testing.T) {
		a, b := vms[0], vms[1]
		s.apply(t, condSlice(viaAPINS, svc, "web-1", port, ready(b.v4)))
		if err := waitFor(20*time.Second, 20*time.Millisecond, func() error {
			if !answeredBy("/api/", b.name) {
				return fmt.Errorf("not on %s yet", b.name)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		long := make(chan response, 1)
		go func() {
			r, err := s.get(s.client(), "/api/?sleep=4s")
			if err != nil {
				r = response{status: -1, body: err.Error()}
			}
			long <- r
		}()
		time.Sleep(500 * time.Millisecond) // the long request is on b
		s.apply(t, condSlice(viaAPINS, svc, "web-1", port, ready(a.v4), draining(b.v4)))
		if err := waitFor(20*time.Second, 20*time.Millisecond, func() error {
			if !answeredBy("/api/", a.name) {
				return fmt.Errorf("not on %s yet", a.name)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		seen := map[string]int{}
		for range 50 {
			seen[s.mustGet(t, cl, "/api/").VM]++
		}
		if seen[b.name] > 0 || seen[a.name] != 50 {
			t.Errorf("after %s turned terminating: answers %v, want all 50 from %s", b.name, seen, a.name)
		}
		if r := <-long; r.status != http.StatusOK || r.reply.VM != b.name {
			t.Errorf("the long request on the draining %s: %d %q from %q, want 200 from it", b.name, r.status, r.body, r.reply.VM)
		}

		// Every endpoint terminating but serving: requests still succeed.
		s.apply(t, condSlice(viaAPINS, svc, "web-1", port, draining(a.v4), draining(b.v4)))
		if err := waitFor(20*time.Second, 20*time.Millisecond, func() error {
			if !answeredBy("/api/", b.name) {
				return fmt.Errorf("the draining %s gets no request yet", b.name)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		seen = map[string]int{}
		for range 50 {
			seen[s.mustGet(t, cl, "/api/").VM]++
		}
		t.Logf("all terminating but serving: answers %v", seen)
	})

	t.Run("APIServerRestart", func(t *testing.T) {
		s.apply(t, condSlice(viaAPINS, svc, "web-1", port, ready(vms[0].v4), ready(vms[1].v4)))
		if err := waitFor(20*time.Second, 20*time.Millisecond, func() error {
			if !answeredBy("/api/", vms[1].name) {
				return fmt.Errorf("not on %s yet", vms[1].name)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		stop := make(chan struct{})
		loop := s.requestLoop("/api/", fromVM, stop)
		var once sync.Once
		var runs []attempt
		stopLoop := func() []attempt {
			once.Do(func() { close(stop); runs = <-loop })
			return runs
		}
		defer stopLoop()
		time.Sleep(time.Second)
		s.apiSrv.stop()
		time.Sleep(3 * time.Second)
		if err := s.runAPIServer(); err != nil {
			t.Fatal(err)
		}
		s.apply(t, condSlice(viaAPINS, svc, "web-1", port, ready(vms[2].v4)))
		applied := time.Now()
		for !answeredBy("/api/", vms[2].name) {
			if time.Since(applied) > 60*time.Second {
				t.Fatalf("after the apiserver restart, the watch did not follow the next change to %s", vms[2].name)
			}
			time.Sleep(5 * time.Millisecond)
		}
		t.Logf("after the restart the next change was followed in %v", time.Since(applied).Round(time.Millisecond))
		time.Sleep(time.Second)
		var failed []string
		for _, a := range stopLoop() {
			if a.err != "" {
				failed = append(failed, fmt.Sprintf("%s: %s", a.start.Format("15:04:05.000"), a.err))
			}
		}
		t.Logf("%d requests through the restart, %d failed", len(runs), len(failed))
		if len(failed) > 0 || len(runs) < 20 {
			t.Errorf("%d of %d requests failed while the apiserver restarted (want 0 of at least 20): %v", len(failed), len(runs), failed)
		}
		if n := len(c.logLines("via api: listing or watching EndpointSlices failed", `"service":"web.viaapi.svc.cluster.local:8080"`)); n > 1 {
			t.Errorf("%d outage warnings for web, want at most 1 for one outage", n)
		}
	})
}

// apiShape is what the Shapes test reads of GET /headless/<service>.
type apiShape []struct {
	Endpoints []struct {
		Address string `json:"address"`
	} `json:"endpoints"`
	Status  string `json:"status"`
	Outcome string `json:"outcome"`
}

// getJSONInto decodes the JSON answer of GET url (an admin API's) into
// into; an answer other than 200, or one that does not decode, is an error
// that shows it.
func getJSONInto(url string, into any) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %.300s", url, resp.Status, b)
	}
	if err := json.Unmarshal(b, into); err != nil {
		return fmt.Errorf("GET %s: %w: %.300q", url, err, b)
	}
	return nil
}

// cachedServices is how many Services the cached path's convergence is
// measured on at once.
const cachedServices = 10

// convergeBehindCache changes the slices of the conv-* Services, each
// changes/cachedServices times at a random moment of the cache's 30 s
// (a real change does not wait for the cache to refresh), and returns how
// long each took to reach requests through /cached/. A change not seen
// within 45 s (the cache's 30 s, a refresh, and slack) is an error.
func (s *suite) convergeBehindCache(t *testing.T, vms []*vm, changes int, answeredBy func(path, want string) bool) []time.Duration {
	var mu sync.Mutex
	var out []time.Duration
	var wg sync.WaitGroup
	for i := range cachedServices {
		wg.Go(func() {
			name := fmt.Sprintf("conv-%d", i)
			for k := range changes / cachedServices {
				time.Sleep(time.Duration(rand.Int64N(int64(30 * time.Second))))
				to := vms[(k+1)%2]
				m := condSlice(viaAPINS, name, name, 8080, ready(to.v4))
				if _, err := runInput([]byte(m), s.tool("kubectl"), "--kubeconfig", s.kubeconfig, "apply", "-f", "-"); err != nil {
					t.Errorf("%s change %d: kubectl apply: %v", name, k, err) // not Fatal: this is not the test's goroutine
					return
				}
				applied := time.Now()
				for !answeredBy("/cached/"+name+"/", to.name) {
					if time.Since(applied) > 45*time.Second {
						t.Errorf("%s change %d: behind the cache, never reached %s", name, k, to.name)
						return
					}
					time.Sleep(20 * time.Millisecond)
				}
				mu.Lock()
				out = append(out, time.Since(applied))
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return out
}

// fromVM accepts any 200 from one of the suite's VMs (on their own ports).
func fromVM(r response) string {
	if r.status != http.StatusOK || r.reply.VM == "" {
		return fmt.Sprintf("status %d: %.200s", r.status, r.body)
	}
	return ""
}

// The via-api overlay renders with its Role (list, watch on endpointslices
// in the backend namespace, nothing cluster-wide) and HEADLESS_OPTIONS=via
// api; the example Caddyfile with that option passes `caddy validate`
// without contacting the apiserver its environment names.
func TestDeployViaAPIOverlay(t *testing.T) {
	s := requireSuite(t)
	out, err := run(s.tool("kubectl"), "kustomize", deployDir("overlays/via-api"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"name: HEADLESS_OPTIONS\n          value: via api", "name: caddy-endpointslices\n  namespace: bbs",
		"resources:\n  - endpointslices\n  verbs:\n  - list\n  - watch"} {
		if !strings.Contains(out, want) {
			t.Errorf("the rendered overlay lacks %q", want)
		}
	}
	if strings.Contains(out, "ClusterRole") {
		t.Error("the via-api overlay grants something cluster-wide")
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	contacted := make(chan struct{}, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Close()
			contacted <- struct{}{}
		}
	}()
	dir := t.TempDir()
	cmd := exec.Command(s.caddyBin, "validate", "--config", "../Caddyfile.example", "--adapter", "caddyfile")
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir, "HEADLESS_OPTIONS=via api",
		"KUBERNETES_SERVICE_HOST=127.0.0.1", "KUBERNETES_SERVICE_PORT="+port)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("caddy validate of the example via api: %v\n%s", err, b)
	}
	select {
	case <-contacted:
		t.Error("caddy validate contacted the apiserver")
	case <-time.After(200 * time.Millisecond):
	}
}
