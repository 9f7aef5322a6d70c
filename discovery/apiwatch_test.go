package discovery

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-headless/caddy-headless/kubeapi/apitest"
)

// apiWatcher starts a `via api` Watcher of ref against fake.
func apiWatcher(t *testing.T, fake *apitest.API, ref string, mod func(*Config)) (*Watcher, *observer.ObservedLogs) {
	t.Helper()
	svc, err := ParseService(ref, Defaults{})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Service: svc, IPv4: true, IPv6: true,
		API: &APISource{Endpoint: fake.URL(), CAFile: fake.CAFile, TokenFile: fake.TokenFile}}
	if mod != nil {
		mod(&cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.InfoLevel)
	w := Start(cfg, zap.New(core))
	t.Cleanup(w.Stop)
	return w, logs
}

// await waits until the Watcher's snapshot satisfies ok (no time limit of
// its own: the test's deadline is the bound).
func await(t *testing.T, w *Watcher, what string, ok func(*Snapshot) bool) *Snapshot {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for {
		w.mu.Lock()
		ch := w.published
		w.mu.Unlock()
		if s := w.Snapshot(); s != nil && ok(s) {
			return s
		}
		select {
		case <-ch:
		case <-ctx.Done():
			s := w.Snapshot()
			if s == nil {
				t.Fatalf("waiting for %s: no snapshot", what)
			}
			t.Fatalf("waiting for %s: last snapshot has %v, err %v, unavailable %v", what, dialList(s.Endpoints), s.Err, s.Unavailable)
		}
	}
}

func dialList(eps []Endpoint) []string {
	var out []string
	for _, e := range eps {
		out = append(out, e.Dial)
	}
	return out
}

func hasDials(want ...string) func(*Snapshot) bool {
	return func(s *Snapshot) bool { return slices.Equal(dialList(s.Endpoints), want) }
}

var http8080 = []apitest.Port{{Name: "http", Port: 8080}}

// All slices of the Service and both families are merged, deduplicated
// and sorted; a change pushed by the watch is the new set, without a
// second list.
func TestAPIListThenWatch(t *testing.T) {
	fake := apitest.New(t, "bbs")
	fake.Apply("bbs", apitest.Slice("web-a", "web", "IPv4", http8080, apitest.Ready("10.0.0.2"), apitest.Ready("10.0.0.1")))
	fake.Apply("bbs", apitest.Slice("web-b", "web", "IPv4", http8080, apitest.Ready("10.0.0.3", "10.0.0.1")))
	fake.Apply("bbs", apitest.Slice("web-6", "web", "IPv6", http8080, apitest.Ready("fd00::1")))
	fake.Apply("bbs", apitest.Slice("other", "other", "IPv4", http8080, apitest.Ready("10.9.9.9")))
	w, _ := apiWatcher(t, fake, "web.bbs:8080", nil)
	s := await(t, w, "the listed set", hasDials("10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080", "[fd00::1]:8080"))
	if s.API == nil || s.API.Slices != 3 || s.API.ResourceVersion == "" {
		t.Fatalf("API state = %+v, want 3 slices and a resourceVersion", s.API)
	}
	fake.Apply("bbs", apitest.Slice("web-b", "web", "IPv4", http8080, apitest.Ready("10.0.0.4")))
	await(t, w, "the watched change", hasDials("10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.4:8080", "[fd00::1]:8080"))
	fake.Delete("bbs", "web-6")
	await(t, w, "the deleted slice gone", hasDials("10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.4:8080"))
	lists := 0
	for _, r := range fake.Requests() {
		if strings.HasPrefix(r, "list") {
			lists++
		}
	}
	if lists != 1 {
		t.Fatalf("requests %q: want exactly one list, then the watch", fake.Requests())
	}
	if st := w.Stats(); st.Events < 2 || st.Relists != 1 {
		t.Fatalf("stats events=%d relists=%d, want >=2 and 1", st.Events, st.Relists)
	}
}

// A named port is the slice port of that name, whose number may differ
// from slice to slice; slices without it contribute nothing.
func TestAPINamedPort(t *testing.T) {
	fake := apitest.New(t, "bbs")
	fake.Apply("bbs", apitest.Slice("a", "web", "IPv4", []apitest.Port{{Name: "http", Port: 8080}, {Name: "admin", Port: 9000}}, apitest.Ready("10.0.0.1")))
	fake.Apply("bbs", apitest.Slice("b", "web", "IPv4", []apitest.Port{{Name: "http", Port: 8081}}, apitest.Ready("10.0.0.2")))
	fake.Apply("bbs", apitest.Slice("c", "web", "IPv4", []apitest.Port{{Name: "grpc", Port: 7000}}, apitest.Ready("10.0.0.3")))
	w, _ := apiWatcher(t, fake, "web.bbs:http", nil)
	await(t, w, "named port", hasDials("10.0.0.1:8080", "10.0.0.2:8081"))
	w2, _ := apiWatcher(t, fake, "web.bbs:metrics", nil)
	s := await(t, w2, "an error", func(s *Snapshot) bool { return s.Unavailable != nil })
	if !strings.Contains(s.Unavailable.Error(), `port named "metrics"`) {
		t.Fatalf("error %q does not name the missing port", s.Unavailable)
	}
}

// Ready endpoints get requests; serving and terminating ones only while
// none is ready (kube-proxy's terminating fallback); not serving: never.
func TestAPIConditions(t *testing.T) {
	fake := apitest.New(t, "bbs")
	draining := apitest.Endpoint{Addresses: []string{"10.0.0.2"}, Serving: true, Terminating: true, Zone: "z1", NodeName: "n1"}
	gone := apitest.Endpoint{Addresses: []string{"10.0.0.3"}, Terminating: true}
	fake.Apply("bbs", apitest.Slice("a", "web", "IPv4", http8080, apitest.Ready("10.0.0.1"), draining, gone))
	w, _ := apiWatcher(t, fake, "web.bbs:8080", nil)
	s := await(t, w, "the ready one only", hasDials("10.0.0.1:8080"))
	var seen []string
	for _, e := range s.API.Endpoints {
		seen = append(seen, e.Dial)
		if e.Dial == "10.0.0.2:8080" && (e.Used || !e.Serving || !e.Terminating || e.Zone != "z1" || e.NodeName != "n1") {
			t.Fatalf("draining endpoint shown as %+v", e)
		}
	}
	if len(seen) != 3 {
		t.Fatalf("API endpoints %v: want all three with their conditions", seen)
	}
	fake.Apply("bbs", apitest.Slice("a", "web", "IPv4", http8080, draining, gone))
	await(t, w, "the terminating fallback", hasDials("10.0.0.2:8080"))
	fake.Apply("bbs", apitest.Slice("a", "web", "IPv4", http8080, gone))
	s = await(t, w, "no endpoint", func(s *Snapshot) bool { return len(s.Endpoints) == 0 })
	if s.Unavailable == nil || !strings.Contains(s.Unavailable.Error(), "web.bbs") {
		t.Fatalf("unavailable = %v, want an error naming the Service", s.Unavailable)
	}
}

// No EndpointSlice: an error naming the Service, as NXDOMAIN does.
func TestAPINoSlice(t *testing.T) {
	fake := apitest.New(t, "bbs")
	w, _ := apiWatcher(t, fake, "ghost.bbs:8080", nil)
	s := await(t, w, "an error", func(s *Snapshot) bool { return s.Unavailable != nil })
	if s.Err != nil || !strings.Contains(s.Unavailable.Error(), "kubernetes.io/service-name=ghost in namespace bbs") {
		t.Fatalf("err %v, unavailable %v: want no failure and an error naming ghost in bbs", s.Err, s.Unavailable)
	}
	if _, err := w.Endpoints(context.Background()); err == nil {
		t.Fatal("a request found endpoints of a Service without slices")
	}
}

// Slice addresses pass the address policy DNS answers pass: anyone who can
// edit the namespace can write an EndpointSlice.
func TestAPIAddressPolicy(t *testing.T) {
	fake := apitest.New(t, "bbs")
	fake.Apply("bbs", apitest.Slice("a", "web", "IPv4", http8080, apitest.Ready("10.0.0.1", "127.0.0.1", "169.254.169.254", "not-an-ip", "0.0.0.0")))
	w, _ := apiWatcher(t, fake, "web.bbs:8080", nil)
	s := await(t, w, "only the pod address", hasDials("10.0.0.1:8080"))
	refused := map[string]string{}
	for _, e := range s.API.Endpoints {
		refused[e.Dial] = e.Refused
	}
	if refused["127.0.0.1:8080"] != RefusedLoopback || refused["169.254.169.254:8080"] != RefusedLinkLocal || refused["not-an-ip"] == "" {
		t.Fatalf("refused = %v", refused)
	}
	if w.Stats().Refused < 4 {
		t.Fatalf("stats refused = %d, want 4", w.Stats().Refused)
	}
}

// A per-pod reference is the endpoint with that hostname.
func TestAPIPerPod(t *testing.T) {
	fake := apitest.New(t, "bbs")
	e0 := apitest.Ready("10.0.0.1")
	e0.Hostname = "web-0"
	e1 := apitest.Ready("10.0.0.2")
	e1.Hostname = "web-1"
	fake.Apply("bbs", apitest.Slice("a", "web", "IPv4", http8080, e0, e1))
	w, _ := apiWatcher(t, fake, "web-1.web.bbs.svc:8080", nil)
	await(t, w, "web-1 only", hasDials("10.0.0.2:8080"))
	w2, _ := apiWatcher(t, fake, "web-7.web.bbs.svc:8080", nil)
	s := await(t, w2, "an error", func(s *Snapshot) bool { return s.Unavailable != nil })
	if !strings.Contains(s.Unavailable.Error(), `hostname "web-7"`) {
		t.Fatalf("error %q does not name the hostname", s.Unavailable)
	}
}

// A watch that ends resumes from the last resourceVersion seen, a bookmark's
// included; a 410 Gone (the version was compacted) leads to a new list.
func TestAPIResumeAndRelistOnGone(t *testing.T) {
	fake := apitest.New(t, "bbs")
	fake.Apply("bbs", apitest.Slice("a", "web", "IPv4", http8080, apitest.Ready("10.0.0.1")))
	w, _ := apiWatcher(t, fake, "web.bbs:8080", nil)
	await(t, w, "listed", hasDials("10.0.0.1:8080"))
	fake.Apply("other", apitest.Slice("x", "x", "IPv4", http8080, apitest.Ready("10.1.0.1"))) // moves the resourceVersion on
	fake.Bookmark()
	rv := ""
	for i := 0; rv == "" || !slices.Contains(fake.Requests(), "watch bbs from "+rv); i++ {
		if i == 1000 {
			t.Fatalf("the watch never resumed from the bookmark's resourceVersion %s: requests %q", rv, fake.Requests())
		}
		time.Sleep(10 * time.Millisecond)
		fake.EndStreams() // until the watcher has taken the bookmark and resumed from it
		rv = bookmarkRV(fake)
	}
	fake.Apply("bbs", apitest.Slice("a", "web", "IPv4", http8080, apitest.Ready("10.0.0.2")))
	await(t, w, "change after resume", hasDials("10.0.0.2:8080"))
	if w.Stats().Relists != 1 {
		t.Fatalf("relists = %d after a resume, want 1 (no relist)", w.Stats().Relists)
	}

	fake.SetDown(true)
	fake.Apply("bbs", apitest.Slice("a", "web", "IPv4", http8080, apitest.Ready("10.0.0.3")))
	fake.Compact()
	fake.SetDown(false)
	await(t, w, "the relisted set", hasDials("10.0.0.3:8080"))
	if w.Stats().Relists != 2 {
		t.Fatalf("relists = %d, want 2 (after the 410)", w.Stats().Relists)
	}
	if w.Stats().StreamRestarts == 0 {
		t.Fatal("no stream restart counted")
	}
}

// bookmarkRV is the resourceVersion of the fake's newest event.
func bookmarkRV(fake *apitest.API) string { return fake.ResourceVersion() }

// While the apiserver is down the last set is kept and one warning is
// logged for the whole outage; afterwards the watch follows changes again.
func TestAPIOutageKeepsSet(t *testing.T) {
	fake := apitest.New(t, "bbs")
	fake.Apply("bbs", apitest.Slice("a", "web", "IPv4", http8080, apitest.Ready("10.0.0.1")))
	w, logs := apiWatcher(t, fake, "web.bbs:8080", nil)
	await(t, w, "listed", hasDials("10.0.0.1:8080"))
	fake.SetDown(true)
	s := await(t, w, "failures", func(s *Snapshot) bool { return s.Err != nil })
	for i := 0; i < 3; i++ {
		prev := s.Seq
		s = await(t, w, "another failure", func(s *Snapshot) bool { return s.Seq > prev && s.Err != nil })
	}
	if !slices.Equal(dialList(s.Endpoints), []string{"10.0.0.1:8080"}) || !s.Stale() {
		t.Fatalf("endpoints %v stale=%t during the outage: want the last set kept", dialList(s.Endpoints), s.Stale())
	}
	if eps, err := w.Endpoints(context.Background()); err != nil || len(eps) != 1 {
		t.Fatalf("request during the outage: %v, %v", eps, err)
	}
	if n := logs.FilterLevelExact(zapcore.WarnLevel).Len(); n != 1 {
		t.Fatalf("%d warnings over 4 failed attempts: want one per outage", n)
	}
	fake.SetDown(false)
	fake.Apply("bbs", apitest.Slice("a", "web", "IPv4", http8080, apitest.Ready("10.0.0.9")))
	s = await(t, w, "recovered", hasDials("10.0.0.9:8080"))
	if s.Err != nil || s.Stale() {
		t.Fatalf("after recovery err=%v stale=%t", s.Err, s.Stale())
	}
	if logs.FilterMessageSnippet("recovered").Len() != 1 {
		t.Fatal("no recovery logged")
	}
}

// Missing RBAC is reported on the first attempt, naming the Service, the
// namespace and the verb.
func TestAPIForbiddenNamesVerb(t *testing.T) {
	fake := apitest.New(t)
	fake.Allow("watch", "bbs")
	w, logs := apiWatcher(t, fake, "web.bbs:8080", nil)
	s := await(t, w, "a failure", func(s *Snapshot) bool { return s.Err != nil })
	for _, want := range []string{"web", "bbs", `"list"`, `"endpointslices"`, "403"} {
		if !strings.Contains(s.Err.Error(), want) {
			t.Errorf("error %q does not name %s", s.Err, want)
		}
	}
	if logs.FilterLevelExact(zapcore.WarnLevel).Len() != 1 {
		t.Fatal("the first failed attempt logged no warning")
	}
	fake.Allow("list", "bbs")
	fake.Deny("watch", "bbs")
	s = await(t, w, "the watch refused", func(s *Snapshot) bool { return s.Err != nil && strings.Contains(s.Err.Error(), `"watch"`) })
	if !strings.Contains(s.Err.Error(), "web in namespace bbs") {
		t.Fatalf("error %q does not name the Service", s.Err)
	}
}

// A wrong CA is reported by the watcher, not at provisioning.
func TestAPIBadCA(t *testing.T) {
	fake := apitest.New(t, "bbs")
	w, _ := apiWatcher(t, fake, "web.bbs:8080", func(c *Config) { c.API.CAFile = "/nonexistent/ca.crt" })
	s := await(t, w, "a failure", func(s *Snapshot) bool { return s.Err != nil })
	if !strings.Contains(s.Err.Error(), "ca_file") || !strings.Contains(s.Err.Error(), "service web in namespace bbs") {
		t.Fatalf("error %q does not name ca_file and the Service", s.Err)
	}
	if len(fake.Requests()) != 0 {
		t.Fatal("requests were sent without a CA")
	}
}

// New (provisioning) contacts nothing: only Run does.
func TestAPINewContactsNothing(t *testing.T) {
	fake := apitest.New(t, "bbs")
	svc, _ := ParseService("web.bbs:8080", Defaults{})
	w := New(Config{Service: svc, IPv4: true, API: &APISource{Endpoint: fake.URL(), CAFile: fake.CAFile, TokenFile: fake.TokenFile}}, nil)
	defer w.Stop()
	time.Sleep(50 * time.Millisecond)
	if r := fake.Requests(); len(r) != 0 {
		t.Fatalf("New sent %q", r)
	}
}

// Config.Validate refuses names a watch cannot ask about.
func TestAPIValidate(t *testing.T) {
	for ref, ok := range map[string]bool{"web.bbs:8080": true, "web-0.web.bbs.svc:http": true, "example.com.:80": false, "a.b.c:80": false} {
		svc, err := ParseService(ref, Defaults{})
		if err != nil {
			t.Fatal(err)
		}
		err = Config{Service: svc, IPv4: true, API: &APISource{Endpoint: "https://127.0.0.1:6443"}}.Validate()
		if (err == nil) != ok {
			t.Errorf("%s: Validate = %v", ref, err)
		}
	}
	svc, _ := ParseService("web.bbs:80", Defaults{})
	if err := (Config{Service: svc, IPv4: true, API: &APISource{Endpoint: "10.0.0.1:443"}}).Validate(); err == nil || !strings.Contains(err.Error(), "endpoint") {
		t.Errorf("bad endpoint: Validate = %v", err)
	}
}

// The defaults of via api come from the pod: the apiserver from
// KUBERNETES_SERVICE_HOST/PORT, ca.crt and token next to the namespace file.
func TestDetectAPIDefaults(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"namespace", "ca.crt", "token"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	env := map[string]string{"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
	d := Environment{ResolvConf: filepath.Join(dir, "none"), NamespaceFile: filepath.Join(dir, "namespace"),
		Getenv: func(k string) string { return env[k] }}.Detect()
	if d.APIServer != "https://[fd00::1]:443" || d.APICAFile != filepath.Join(dir, "ca.crt") || d.APITokenFile != filepath.Join(dir, "token") {
		t.Fatalf("Detect() = %+v", d)
	}
	d = Environment{ResolvConf: filepath.Join(dir, "none"), NamespaceFile: "/nonexistent/namespace",
		Getenv: func(string) string { return "" }}.Detect()
	if d.APIServer != "" || d.APICAFile != "" || d.APITokenFile != "" {
		t.Fatalf("outside a pod: Detect() = %+v", d)
	}
}

// 1,000 endpoints over 10 slices: all of them, once each, sorted.
func TestAPIThousandEndpointsTenSlices(t *testing.T) {
	fake := apitest.New(t, "bbs")
	var want []string
	for sl := range 10 {
		var eps []apitest.Endpoint
		for i := range 100 {
			addr := fmt.Sprintf("10.1.%d.%d", sl, i+1)
			eps = append(eps, apitest.Ready(addr))
			want = append(want, addr+":8080")
		}
		fake.Apply("bbs", apitest.Slice(fmt.Sprintf("big-%d", sl), "big", "IPv4", http8080, eps...))
	}
	slices.SortFunc(want, func(a, b string) int {
		return netip.MustParseAddrPort(a).Compare(netip.MustParseAddrPort(b))
	})
	w, _ := apiWatcher(t, fake, "big.bbs:8080", nil)
	s := await(t, w, "1,000 endpoints", func(s *Snapshot) bool { return len(s.Endpoints) == 1000 })
	if !slices.Equal(dialList(s.Endpoints), want) {
		t.Fatal("the 1,000 endpoints are not every address once, sorted")
	}
}
