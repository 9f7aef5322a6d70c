package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Health check settings of TestHealthChecks, and the bound within which a
// change of an endpoint's health must show: the probes needed (interval ×
// fails or passes), one probe timeout, and a generous allowance for a loaded
// machine (the jitter only shortens the waits).
const (
	hcInterval = time.Second
	hcFails    = 2
	hcPasses   = 2
	hcTimeout  = time.Second
	hcBound    = hcInterval*hcFails + hcTimeout + 6*time.Second
)

// TestHealthChecks kills a VM's HTTP server while its EndpointSlice stays
// ready (so DNS keeps handing it out): the health checks take it out of
// rotation with no failed request (retries on), GET /headless/ says it is
// unhealthy, and once its server is back it gets traffic again after
// health_passes passes. With both VMs dead the source fails open: requests
// are still sent to them (502, not 503) and caddy_headless_health_panic is 1.
func TestHealthChecks(t *testing.T) {
	s := requireSuite(t)
	vms := s.useVMs(t, 5, 6)
	live, dead := vms[0], vms[1]
	// Whatever happens, the VMs' servers run again after this test: the
	// other scenarios use them.
	t.Cleanup(func() {
		for _, v := range vms {
			if v.proc == nil || v.proc.exited() {
				if err := s.restartVM(v); err != nil {
					t.Errorf("restarting %s's server: %v", v.name, err)
				}
			}
		}
	})

	ports := map[string]int{"http": 8080}
	s.namespace(t, "health")
	s.apply(t, headlessService("health", "vm", ports),
		endpointSlice("health", "vm", "vm-1", "IPv4", ports,
			endpoint{addr: live.v4, ready: true}, endpoint{addr: dead.v4, ready: true}))
	checks := fmt.Sprintf("health_uri /healthz\n\t\thealth_interval %v\n\t\thealth_fails %d\n\t\thealth_passes %d\n\t\thealth_timeout %v",
		hcInterval, hcFails, hcPasses, hcTimeout)
	// The access log says, per request, how often Caddy retried it: a
	// retried request was first sent to the dead VM.
	// It goes to a file of its own, so that Caddy's log, printed when the
	// test fails, is not drowned in it.
	accessLog := filepath.Join(s.dir, fmt.Sprintf("health-access-%d.log", time.Now().UnixNano()))
	body := "\tlog {\n\t\toutput file " + accessLog + "\n\t}\n\tlog_append retries {http.reverse_proxy.retries}\n\tlog_append upstream {http.reverse_proxy.upstream.hostport}\n" +
		s.proxyTo("", "vm.health:8080", checks, "lb_try_duration 5s\n\t\tlb_retries 2")
	c := s.startCaddy(t, body)
	cl := s.client()
	const service = "vm.health.svc.cluster.local:8080"
	liveAddr, deadAddr := net.JoinHostPort(live.v4, "8080"), net.JoinHostPort(dead.v4, "8080")

	if err := waitFor(hcBound, 100*time.Millisecond, func() error {
		return c.wantHealth(service, map[string]string{liveAddr: "healthy", deadAddr: "healthy"})
	}); err != nil {
		t.Fatalf("before any change, both endpoints must pass their health checks: %v", err)
	}
	assertSet(t, s.spread(t, cl, "/", 20), live.name, dead.name)

	// 1. The dead VM leaves the rotation; no request fails.
	l := s.startLoad(cl, "/", 2)
	time.Sleep(time.Second)
	killed := time.Now()
	dead.stop()
	t.Logf("%s's server killed at %s (its EndpointSlice entry stays ready)", dead.name, killed.Format("15:04:05.000"))
	if err := waitFor(hcBound, 50*time.Millisecond, func() error {
		return c.wantHealth(service, map[string]string{liveAddr: "healthy", deadAddr: "unhealthy"})
	}); err != nil {
		l.end(t, "while the dead VM was being detected")
		t.Fatalf("%s's server killed, but GET /headless/ does not show it unhealthy within %v: %v", dead.name, hcBound, err)
	}
	unhealthyAfter := time.Since(killed)
	// Long enough for any straggler to show, and for a DNS refresh or two
	// (which still returns the dead VM).
	time.Sleep(2 * refreshMax)
	l.end(t, "dead VM detected by health checks")
	if l.perVM[live.name] == 0 {
		t.Errorf("answers per VM %v: want %s", l.perVM, live.name)
	}
	retried := retriedSince(t, accessLog, killed)
	var lastTry time.Duration
	for _, at := range retried {
		lastTry = max(lastTry, at.Sub(killed))
	}
	t.Logf("health: dead VM marked unhealthy in GET /headless/ after %v (bound %v)", unhealthyAfter.Round(time.Millisecond), hcBound)
	t.Logf("health: dead VM out of rotation after %v: the last request Caddy tried on it (then retried on %s); %d requests retried since the kill",
		lastTry.Round(time.Millisecond), live.name, len(retried))
	// A request that began just before GET /headless/ showed the
	// endpoint unhealthy (polled every 50 ms) may still have tried it;
	// none may after that.
	if lastTry > unhealthyAfter+500*time.Millisecond || lastTry > hcBound {
		t.Errorf("a request was tried on the dead VM %v after the kill, but it was unhealthy after %v", lastTry.Round(time.Millisecond), unhealthyAfter.Round(time.Millisecond))
	}
	if lines := c.logLines("endpoint failed health checks", deadAddr); len(lines) == 0 {
		t.Errorf("Caddy's log does not say that %s failed its health checks", deadAddr)
	}

	// 2. The VM's server is back: traffic returns after hcPasses passes.
	l = s.startLoad(cl, "/", 2)
	restarted := time.Now()
	if err := s.restartVM(dead); err != nil {
		l.end(t, "while restarting the VM")
		t.Fatalf("restarting %s's server: %v", dead.name, err)
	}
	cl2 := s.client()
	if err := waitFor(hcBound, 20*time.Millisecond, func() error {
		r := s.mustGet(t, cl2, "/")
		if r.VM != dead.name {
			return fmt.Errorf("answered by %s", r.VM)
		}
		return nil
	}); err != nil {
		l.end(t, "while the VM came back")
		t.Fatalf("%s's server is back, but it gets no traffic within %v: %v", dead.name, hcBound, err)
	}
	backAfter := time.Since(restarted)
	if err := c.wantHealth(service, map[string]string{liveAddr: "healthy", deadAddr: "healthy"}); err != nil {
		t.Errorf("%s answers again, but GET /headless/: %v", dead.name, err)
	}
	t.Logf("health: VM back in rotation after %v (health_passes %d × health_interval %v; bound %v)",
		backAfter.Round(time.Millisecond), hcPasses, hcInterval, hcBound)
	if backAfter < time.Duration(hcPasses-1)*hcInterval/2 {
		t.Errorf("%s got traffic %v after its server restarted: sooner than %d passes allow", dead.name, backAfter, hcPasses)
	}
	time.Sleep(time.Second)
	l.end(t, "VM back")
	assertSet(t, s.spread(t, cl, "/", 20), live.name, dead.name)
	if lines := c.logLines("endpoint passes health checks again", deadAddr); len(lines) == 0 {
		t.Errorf("Caddy's log does not say that %s passes its health checks again", deadAddr)
	}

	// 3. Both dead: fail open. Requests are still sent to the endpoints
	// (a dial error, 502), not refused for want of upstreams (503).
	live.stop()
	dead.stop()
	if err := waitFor(hcBound, 50*time.Millisecond, func() error {
		return c.wantHealth(service, map[string]string{liveAddr: "unhealthy", deadAddr: "unhealthy"})
	}); err != nil {
		t.Fatalf("both servers killed, but GET /headless/: %v", err)
	}
	for range 5 {
		r, err := s.get(cl, "/")
		if err != nil {
			t.Fatalf("with both VMs dead: %v", err)
		}
		if r.status != http.StatusBadGateway {
			t.Fatalf("with both VMs dead and failing open, GET / answered %d %q; want 502 (tried, dial failed)", r.status, r.body)
		}
	}
	if v, err := c.metric("caddy_headless_health_panic", service); err != nil || v != 1 {
		t.Errorf("with both VMs dead, caddy_headless_health_panic = %v (%v), want 1", v, err)
	}
	if lines := c.logLines("no endpoint passes health checks; failing open", service); len(lines) == 0 {
		t.Errorf("Caddy's log does not say that it fails open for %s", service)
	}
	t.Logf("health: both VMs dead → fail open: requests still tried (502), caddy_headless_health_panic 1")

	// Both back: the panic ends.
	for _, v := range vms {
		if err := s.restartVM(v); err != nil {
			t.Fatalf("restarting %s's server: %v", v.name, err)
		}
	}
	if err := waitFor(hcBound, 100*time.Millisecond, func() error {
		if err := c.wantHealth(service, map[string]string{liveAddr: "healthy", deadAddr: "healthy"}); err != nil {
			return err
		}
		if v, err := c.metric("caddy_headless_health_panic", service); err != nil || v != 0 {
			return fmt.Errorf("caddy_headless_health_panic = %v (%v)", v, err)
		}
		return nil
	}); err != nil {
		t.Fatalf("both servers back, but: %v", err)
	}
	assertSet(t, s.spread(t, cl, "/", 20), live.name, dead.name)
}

// restartVM starts a VM's server again, as startVMs does, and waits until it
// answers.
func (s *suite) restartVM(v *vm) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if err := v.checkRoute(v.v4); err != nil {
		return err
	}
	p, err := startProcess(s.dir, v.name, []string{"E2E_VM_NAME=" + v.name},
		"ip", "netns", "exec", v.ns, self, "-test.run=^$")
	if err != nil {
		return err
	}
	v.proc = p
	c := &http.Client{Timeout: time.Second}
	return waitFor(20*time.Second, 20*time.Millisecond, func() error {
		if p.exited() {
			return fmt.Errorf("%s's server exited: %v\n%s", v.name, p.Err(), p.tail(20))
		}
		return httpOK(c, fmt.Sprintf("http://%s/ready", net.JoinHostPort(v.v4, "8080")), "")
	})
}

// headlessWatcher is the part of a GET /headless/ answer the test reads.
type headlessWatcher struct {
	Service   string `json:"service"`
	Endpoints []struct {
		Address   string `json:"address"`
		Health    string `json:"health"`
		LastError string `json:"last_error"`
	} `json:"endpoints"`
	HealthChecks *struct {
		Healthy int  `json:"healthy"`
		Panic   bool `json:"panic"`
	} `json:"health_checks"`
}

// wantHealth returns nil if GET /headless/ shows the service's endpoints
// with exactly the given health (address → health).
func (c *caddy) wantHealth(service string, want map[string]string) error {
	var ws []headlessWatcher
	if err := getJSONInto(c.admin+"/headless/", &ws); err != nil {
		return err
	}
	for _, w := range ws {
		if w.Service != service {
			continue
		}
		if w.HealthChecks == nil {
			return fmt.Errorf("GET /headless/: %s has no health_checks", service)
		}
		got := map[string]string{}
		for _, e := range w.Endpoints {
			got[e.Address] = e.Health
			if e.LastError != "" {
				got[e.Address] += " (" + e.LastError + ")"
			}
		}
		ok := len(got) == len(want)
		for a, h := range want {
			if g := got[a]; g != h && !strings.HasPrefix(g, h+" (") {
				ok = false
			}
		}
		if !ok {
			return fmt.Errorf("GET /headless/: %s endpoints %v, want %v", service, got, want)
		}
		return nil
	}
	var names []string
	for _, w := range ws {
		names = append(names, w.Service)
	}
	return fmt.Errorf("GET /headless/: no watcher for %s (watchers: %v)", service, names)
}

// metric returns the value of the series of name with service="<service>"
// from the admin endpoint's /metrics.
func (c *caddy) metric(name, service string) (float64, error) {
	resp, err := http.Get(c.admin + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") || !strings.Contains(line, `service="`+service+`"`) {
			continue
		}
		f := strings.Fields(line)
		return strconv.ParseFloat(f[len(f)-1], 64)
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no %s{service=%q} in /metrics", name, service)
}

// retriedSince returns the start times (in log order) of the requests in
// the access log that began after since and were retried.
func retriedSince(t *testing.T, accessLog string, since time.Time) []time.Time {
	t.Helper()
	b, err := os.ReadFile(accessLog)
	if err != nil {
		t.Fatalf("reading the access log: %v", err)
	}
	var out []time.Time
	entries := 0
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.Contains(line, `"retries"`) {
			continue
		}
		entries++
		var e map[string]any
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("access log line: %v: %q", err, line)
		}
		ts, ok := e["ts"].(float64)
		if !ok {
			t.Fatalf("access log line without a numeric ts: %q", line)
		}
		// The entry is written when the response is done; the request,
		// and with it the attempt on the first upstream, began duration
		// seconds earlier.
		if d, ok := e["duration"].(float64); ok {
			ts -= d
		}
		sec, frac := math.Modf(ts)
		at := time.Unix(int64(sec), int64(frac*1e9))
		if at.Before(since) {
			continue
		}
		if n, _ := strconv.Atoi(fmt.Sprint(e["retries"])); n > 0 {
			out = append(out, at)
		}
	}
	if entries == 0 {
		t.Fatalf("the access log %s has no entries with retries: %.300q", accessLog, b)
	}
	return out
}
