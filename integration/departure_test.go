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

// Endpoints leave the way pods leave, on a real cluster on a bad day: the
// suite's CoreDNS answers with kubeadm's `ttl 30`, and a second CoreDNS in
// front of it is the node-local cache (NodeLocal DNSCache's `cache` block).
// One Caddy, headless_proxy with its defaults only (a resolver must be named:
// the suite never asks the machine's), one handler per path: /direct/ asks
// CoreDNS, /cached/ asks the cache, /api/ watches the EndpointSlices (`via
// api`, as a token bound to the deploy overlay's Role). A request loop per
// path runs throughout.

const podPort = 9090

// backendPod is a "pod" of the scenario: a server on podPort inside a VM's network
// namespace (the VM's own servers keep running on their ports).
type backendPod struct {
	v    *vm
	proc *process
}

func (s *suite) startBackendPod(t *testing.T, v *vm) *backendPod {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	name := "pod-" + v.name
	p, err := startProcess(s.dir, name+"-"+fmt.Sprint(time.Now().UnixNano()),
		[]string{"E2E_VM_NAME=" + name, fmt.Sprintf("E2E_VM_PORTS=%d", podPort)},
		"ip", "netns", "exec", v.ns, self, "-test.run=^$")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.stop)
	url := fmt.Sprintf("http://%s/", net.JoinHostPort(v.v4, fmt.Sprint(podPort)))
	if err := waitFor(20*time.Second, 50*time.Millisecond, func() error {
		if p.exited() {
			return fmt.Errorf("%s exited: %v\n%s", name, p.Err(), p.tail(20))
		}
		return httpOK(http.DefaultClient, url, "")
	}); err != nil {
		t.Fatal(err)
	}
	return &backendPod{v: v, proc: p}
}

// startNodeLocalCache runs a second CoreDNS with NodeLocal DNSCache's cache
// settings, forwarding cluster.local to the suite's CoreDNS, and returns its
// address.
func (s *suite) startNodeLocalCache(t *testing.T) string {
	t.Helper()
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cf := filepath.Join(dir, "Corefile")
	if err := os.WriteFile(cf, []byte(fmt.Sprintf(`cluster.local:%d {
	bind 127.0.0.1
	errors
	cache {
		success 9984 30
		denial 9984 5
	}
	forward . %s {
		force_tcp
	}
}
`, port, s.dnsAddr())), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := startProcess(s.dir, fmt.Sprintf("nodelocaldns-%d", port), nil, s.tool("coredns"), "-conf", cf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.stop)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	if err := waitFor(20*time.Second, 100*time.Millisecond, func() error {
		if p.exited() {
			return fmt.Errorf("node-local cache exited: %v\n%s", p.Err(), p.tail(20))
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return addr
}

// startCoreDNSDefaultTTL runs a CoreDNS whose kubernetes plugin reads the
// suite's apiserver with its default TTL of 5 s, and returns its address.
func (s *suite) startCoreDNSDefaultTTL(t *testing.T) string {
	t.Helper()
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	ready, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	cf := filepath.Join(t.TempDir(), "Corefile")
	if err := os.WriteFile(cf, []byte(fmt.Sprintf(`cluster.local:%d {
	bind 127.0.0.1
	errors
	ready 127.0.0.1:%d
	kubernetes cluster.local {
		kubeconfig %s e2e
	}
}
`, port, ready, s.kubeconfig)), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := startProcess(s.dir, fmt.Sprintf("coredns-ttl5-%d", port), nil, s.tool("coredns"), "-conf", cf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.stop)
	if err := waitFor(60*time.Second, 200*time.Millisecond, func() error {
		if p.exited() {
			return fmt.Errorf("CoreDNS (ttl 5) exited: %v\n%s", p.Err(), p.tail(20))
		}
		return httpOK(http.DefaultClient, fmt.Sprintf("http://127.0.0.1:%d/ready", ready), "")
	}); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("127.0.0.1:%d", port)
}

// attempt is one request of a loop.
type attempt struct {
	start time.Time
	took  time.Duration
	err   string // "" for a 200 from a pod
	vm    string
}

// requestLoop sends requests to path one after the other until stop is
// closed; each must get an answer within the client's 10 s that check
// accepts (check says what is wrong, "" if nothing).
func (s *suite) requestLoop(path string, check func(response) string, stop <-chan struct{}) <-chan []attempt {
	out := make(chan []attempt, 1)
	go func() {
		cl := s.client() // its own: a hang here hides nothing on another path
		defer cl.CloseIdleConnections()
		var log []attempt
		for {
			select {
			case <-stop:
				out <- log
				return
			default:
			}
			a := attempt{start: time.Now()}
			r, err := s.get(cl, path)
			a.took = time.Since(a.start)
			if err != nil {
				a.err = err.Error()
			} else {
				a.err = check(r)
			}
			a.vm = r.reply.VM
			log = append(log, a)
			time.Sleep(20 * time.Millisecond)
		}
	}()
	return out
}

// fromPod accepts a 200 from a pod of this scenario.
func fromPod(r response) string {
	switch {
	case r.status != http.StatusOK:
		return fmt.Sprintf("status %d: %.200s", r.status, r.body)
	case !strings.HasPrefix(r.reply.VM, "pod-") || !strings.HasSuffix(r.reply.Local, fmt.Sprintf(":%d", podPort)):
		return fmt.Sprintf("answered by %q at %s, not by a pod", r.reply.VM, r.reply.Local)
	}
	return ""
}

// replaceEvery is the pace of the rollout. A cached answer names the pods
// that were in the slice when the cache filled it, for up to 30 s (plus our
// refresh interval). Three pods are replaced one at a time, so the last of
// the first three is stopped 2·replaceEvery + 3 s after the first new pod
// was added: a cache filled just before that still names a live pod while
// this exceeds 31 s (16 s leaves 4 s of margin). A faster rollout can leave
// a cache naming only stopped pods, which no proxy that reads DNS can route
// around (README: Freshness in a real cluster, the drain budget).
const replaceEvery = 16 * time.Second

func TestEndpointsLeaveAbruptly(t *testing.T) {
	s := requireSuite(t)
	vms := s.useVMs(t, 1, 2, 3, 4, 5, 6)
	cache := s.startNodeLocalCache(t)
	const ns, svc = "abrupt", "web"
	ports := map[string]int{"http": podPort}
	s.namespace(t, ns)
	slice := func(ps ...*backendPod) string {
		var eps []endpoint
		for _, p := range ps {
			eps = append(eps, endpoint{addr: p.v.v4, ready: true})
		}
		return endpointSlice(ns, svc, svc+"-1", "IPv4", ports, eps...)
	}
	live := []*backendPod{s.startBackendPod(t, vms[0]), s.startBackendPod(t, vms[1]), s.startBackendPod(t, vms[2])}
	s.apply(t, headlessService(ns, svc, ports), slice(live...))
	token := s.viaAPIToken(t, ns, "caddy-"+ns) // the overlay's Role, in this namespace

	ref := fmt.Sprintf("%s.%s.svc.cluster.local:%d", svc, ns, podPort)
	c := s.startCaddy(t, fmt.Sprintf(`	handle /direct/* {
		headless_proxy %[1]s {
			resolvers %[2]s
		}
	}
	handle /cached/* {
		headless_proxy %[1]s {
			resolvers %[3]s
		}
	}
	handle /api/* {
		headless_proxy %[1]s {
			via api {
				endpoint %[4]s
				ca_file %[5]s
				token_file %[6]s
			}
		}
	}
`, ref, s.dnsAddr(), cache, s.apiURL, s.caFile, token))
	// Both paths answer before the loops start.
	paths := []string{"/direct/", "/cached/", "/api/"}
	for _, path := range paths {
		if err := waitFor(20*time.Second, 100*time.Millisecond, func() error {
			r, err := s.get(s.client(), path)
			if err == nil && r.status != http.StatusOK {
				err = fmt.Errorf("status %d", r.status)
			}
			return err
		}); err != nil {
			t.Fatalf("%s before the scenario: %v", path, err)
		}
	}

	stop := make(chan struct{})
	loops := map[string]<-chan []attempt{}
	for _, path := range paths {
		loops[path] = s.requestLoop(path, fromPod, stop)
	}
	var once sync.Once
	stopLoops := func() map[string][]attempt {
		once.Do(func() { close(stop) })
		out := map[string][]attempt{}
		for p, ch := range loops {
			out[p] = <-ch
		}
		return out
	}
	defer func() {
		select {
		case <-stop:
		default:
			stopLoops()
		}
	}()
	time.Sleep(2 * time.Second)

	// Three abrupt replacements: a new pod is added to the slice; 3 s later
	// an old pod's server stops and, right after, it leaves the slice (the
	// kubelet's SIGTERM winning the race with the EndpointSlice update).
	for i, v := range vms[3:6] {
		if i > 0 {
			time.Sleep(replaceEvery - 3*time.Second)
		}
		fresh := s.startBackendPod(t, v)
		s.apply(t, slice(append(live, fresh)...))
		time.Sleep(3 * time.Second)
		live[0].proc.stop()
		live = append(live[1:], fresh)
		s.apply(t, slice(live...))
	}
	rolled := time.Now()
	time.Sleep(2 * time.Second)

	// A lost node: vm6's pod goes silent (its veth peer down: no RST, no
	// answer) while the slice keeps it ready for 30 s.
	lostVM := vms[5]
	peer := fmt.Sprintf("chlv%d", lostVM.n)
	if _, err := run("ip", "-n", lostVM.ns, "link", "set", peer, "down"); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			if _, err := run("ip", "-n", lostVM.ns, "link", "set", peer, "up"); err != nil {
				t.Errorf("bringing %s back up: %v", peer, err)
			}
		}
	}
	defer restore()
	lost := time.Now()
	time.Sleep(30 * time.Second)
	s.apply(t, slice(live[:len(live)-1]...))
	time.Sleep(5 * time.Second)
	runs := stopLoops()
	restore()

	for _, path := range paths {
		var failedRollout, failedLate, slowLate, early []string
		late := 0
		for _, a := range runs[path] {
			at := a.start.Sub(lost).Round(time.Millisecond)
			switch {
			case a.start.Before(rolled) && a.err != "":
				failedRollout = append(failedRollout, fmt.Sprintf("%s: %s", a.start.Format("15:04:05.000"), a.err))
			case a.start.After(lost.Add(12 * time.Second)):
				late++
				if a.err != "" {
					failedLate = append(failedLate, fmt.Sprintf("loss%+v: %s", at, a.err))
				} else if a.took >= time.Second {
					slowLate = append(slowLate, fmt.Sprintf("loss%+v: took %v", at, a.took.Round(time.Millisecond)))
				}
			case a.start.After(rolled) && a.err != "":
				early = append(early, fmt.Sprintf("loss%+v: %s", at, a.err))
			}
		}
		t.Logf("%s: %d requests; during the rollouts %d failed; in the first 12 s after the loss %d failed (allowed: in flight to the lost node) %v; %d started later, %d failed, %d slower than 1 s",
			path, len(runs[path]), len(failedRollout), len(early), early, late, len(failedLate), len(slowLate))
		if len(failedRollout) > 0 {
			t.Errorf("%s: %d requests failed during three abrupt replacements (want 0): %v", path, len(failedRollout), failedRollout)
		}
		if late < 20 {
			t.Errorf("%s: only %d requests started more than 12 s after the loss: the loop stalled", path, late)
		}
		if len(failedLate) > 0 || len(slowLate) > 0 {
			t.Errorf("%s: of the requests that started more than 12 s after the node was lost, %d failed %v and %d took 1 s or more %v (want every one to succeed in under 1 s)",
				path, len(failedLate), failedLate, len(slowLate), slowLate)
		}
	}

	// The cache is detected on the cached path, and only there.
	var watchers []struct {
		Resolvers   []string `json:"resolvers"`
		Cached      bool     `json:"cached"`
		CacheMaxAge float64  `json:"cache_max_age_seconds"`
	}
	if err := getJSONInto(c.admin+"/headless/", &watchers); err != nil {
		t.Fatal(err)
	}
	if len(watchers) != 3 {
		t.Fatalf("GET /headless/: %d watchers, want 3 (one per resolver, one via api)", len(watchers))
	}
	for _, w := range watchers {
		viaCache := len(w.Resolvers) == 1 && w.Resolvers[0] == cache
		if w.Cached != viaCache {
			t.Errorf("watcher asking %v: cached = %v, want %v", w.Resolvers, w.Cached, viaCache)
		}
		if viaCache && (w.CacheMaxAge < 20 || w.CacheMaxAge > 30) {
			t.Errorf("watcher asking the cache: cache_max_age_seconds = %v, want about 30", w.CacheMaxAge)
		}
	}
	if n := len(c.logLines("DNS answers come from a cache")); n != 1 {
		t.Errorf("%d cache warnings in Caddy's log, want 1 (for the cached path only)", n)
	}
}
