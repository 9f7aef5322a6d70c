package integration

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-headless/caddy-headless/kubestore"
)

// TestPKIReplicasStartTogether (issue 25): three Caddy replicas with
// storage k8s and a config that provisions Caddy's local CA start at the
// same moment on fresh storage (a fresh prefix each round), as the README's
// Role. Every start succeeds and the three admin APIs report one root
// (GET /pki/ca/local).
//
// "kill" does the same while one replica is SIGKILLed holding the lock of a
// CA key pair: each replica talks to the apiserver through its own proxy,
// which holds back the first write of a pair's key (the root's in even
// rounds, the intermediate's in odd ones) and tells the test which replica
// sent it; the test checks that replica holds the pair's Lease and kills
// it. Its certificate is stored, its key is not: the two others must wait
// for the Lease to go stale (lease_duration 2s), write the pair again, and
// start with one root.
func TestPKIReplicasStartTogether(t *testing.T) {
	s := requireSuite(t)
	const ns = "caddy-pki"
	token := s.storageAccount(t, ns)
	rounds := 20
	t.Run("together", func(t *testing.T) {
		t.Parallel()
		s.pkiRounds(t, ns, token, "pkirace", rounds, false)
	})
	t.Run("kill", func(t *testing.T) {
		t.Parallel()
		s.pkiRounds(t, ns, token, "pkikill", rounds, true)
	})
}

// pkiReplica is one Caddy of a round.
type pkiReplica struct {
	name, dir, admin string
	proc             *process
	root             string // PEM from /pki/ca/local
	err              error  // why it did not start
}

func (s *suite) pkiRounds(t *testing.T, ns, token, prefix string, rounds int, kill bool) {
	armed := new(atomic.Bool)
	stalled := make(chan int, 3)
	var proxies []*stallProxy
	for i := range 3 {
		if kill {
			proxies = append(proxies, s.newStallProxy(t, i, armed, stalled))
		}
	}
	failed, split, lockHeld := 0, 0, 0
	var startTimes []time.Duration
	var requests []float64
	for round := range rounds {
		pfx := fmt.Sprintf("%s-%02d", prefix, round)
		stallKey := "pki/authorities/local/root.key"
		if round%2 == 1 {
			stallKey = "pki/authorities/local/intermediate.key"
		}
		for _, p := range proxies {
			p.setKey(stallKey)
		}
		armed.Store(kill)
		reps := make([]*pkiReplica, 3)
		for i := range reps {
			endpoint := s.apiURL
			if kill {
				endpoint = proxies[i].url
			}
			reps[i] = s.newPKIReplica(t, ns, token, pfx, string(rune('a'+i)), endpoint)
		}
		start := time.Now()
		for _, r := range reps {
			r.start(t, s)
		}
		bad := false // this round: dump the logs
		victim := -1
		if kill {
			select {
			case victim = <-stalled:
			case <-time.After(60 * time.Second):
				t.Fatalf("round %d: no replica wrote %s within 60s", round, stallKey)
			}
			holder := s.pkiLockHolder(t, ns, token, pfx, stallKey)
			if strings.HasPrefix(holder, "pki-"+reps[victim].name+"/") {
				lockHeld++
			} else {
				t.Errorf("round %d: replica %s is stalled writing %s, but the pair's Lease is held by %q, not by it", round, reps[victim].name, stallKey, holder)
				bad = true
			}
			_ = syscall.Kill(-reps[victim].proc.Pid(), syscall.SIGKILL)
			<-reps[victim].proc.Done()
		}
		var wg sync.WaitGroup
		for i, r := range reps {
			if i != victim {
				wg.Go(func() { r.wait() })
			}
		}
		wg.Wait()
		roots := map[string][]string{}
		for i, r := range reps {
			if i == victim {
				continue
			}
			if r.err != nil {
				failed++
				bad = true
				t.Errorf("round %d: replica %s failed to start: %v", round, r.name, r.err)
				continue
			}
			roots[r.root] = append(roots[r.root], r.name)
		}
		if len(roots) > 1 {
			split++
			bad = true
			var who []string
			for _, names := range roots {
				who = append(who, strings.Join(names, "+"))
			}
			t.Errorf("round %d: the replicas hold %d different roots (%s)", round, len(roots), strings.Join(who, " / "))
		}
		if !kill && !bad {
			startTimes = append(startTimes, time.Since(start))
			for _, r := range reps {
				requests = append(requests, apiserverRequestsAt(r.admin))
			}
		}
		for _, r := range reps {
			wg.Go(func() { r.proc.stop() })
		}
		wg.Wait()
		if bad {
			for i, r := range reps {
				if i != victim {
					t.Logf("----- round %d replica %s log, last lines -----\n%s", round, r.name, tailFile(r.proc.log, 15))
				}
			}
		}
	}
	what := "3 replicas started together"
	if kill {
		what = fmt.Sprintf("3 replicas started together, the one writing a CA key SIGKILLed (it held the pair's Lease in %d of %d rounds)", lockHeld, rounds)
	}
	t.Logf("%d rounds, %s: %d failed starts, %d rounds with different roots", rounds, what, failed, split)
	if len(startTimes) > 0 {
		sort.Slice(startTimes, func(i, j int) bool { return startTimes[i] < startTimes[j] })
		sum := 0.0
		for _, r := range requests {
			sum += r
		}
		t.Logf("all three up: median %v, max %v after the start; %.1f apiserver requests per replica start (fresh storage: one replica creates the CA)",
			startTimes[len(startTimes)/2].Round(time.Millisecond), startTimes[len(startTimes)-1].Round(time.Millisecond), sum/float64(len(requests)))
	}
}

func (s *suite) newPKIReplica(t *testing.T, ns, token, prefix, name, endpoint string) *pkiReplica {
	t.Helper()
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	r := &pkiReplica{name: name, admin: fmt.Sprintf("http://127.0.0.1:%d", port)}
	if r.dir, err = os.MkdirTemp(s.dir, "pki-"+prefix+"-"+name+"-"); err != nil {
		t.Fatal(err)
	}
	// Only the local CA: no site, no listener, nothing asks DNS.
	cf := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	skip_install_trust
	storage k8s {
		endpoint %s
		ca_file %s
		token_file %s
		namespace %s
		prefix %s
		identity pki-%s
		lease_duration 2s
		renew_interval 1s
	}
}
`, port, endpoint, s.caFile, token, ns, prefix, name)
	if err := os.WriteFile(filepath.Join(r.dir, "Caddyfile"), []byte(cf), 0o644); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *pkiReplica) start(t *testing.T, s *suite) {
	t.Helper()
	var err error
	r.proc, err = startProcess(r.dir, "caddy", []string{"HOME=" + r.dir, "XDG_DATA_HOME=" + r.dir, "XDG_CONFIG_HOME=" + r.dir},
		s.caddyBin, "run", "--config", filepath.Join(r.dir, "Caddyfile"), "--adapter", "caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.proc.stop)
}

// wait sets r.root once the admin API reports the local CA, or r.err as
// soon as the replica exits, or if it does not report it within 60s.
func (r *pkiReplica) wait() {
	deadline := time.Now().Add(60 * time.Second)
	for {
		if r.proc.exited() {
			r.err = fmt.Errorf("exited (%v): %s", r.proc.Err(), lastError(r.proc.log))
			return
		}
		root, err := adminRoot(r.admin)
		if err == nil {
			r.root = root
			return
		}
		if time.Now().After(deadline) {
			r.err = fmt.Errorf("no local CA on the admin API after 60s: %v (still running: %s)", err, lastError(r.proc.log))
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// adminRoot is the local CA's root, PEM, from a Caddy admin API.
func adminRoot(admin string) (string, error) {
	var ca struct {
		Root string `json:"root_certificate"`
	}
	if err := getJSONInto(admin+"/pki/ca/local", &ca); err != nil {
		return "", err
	}
	if ca.Root == "" {
		return "", fmt.Errorf("GET /pki/ca/local: no root_certificate")
	}
	return ca.Root, nil
}

// lastError is the last line of a Caddy log that reports an error.
func lastError(log string) string {
	lines := strings.Split(readFile(log), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], `"error"`) || strings.HasPrefix(lines[i], "Error:") {
			return lines[i]
		}
	}
	return "(no error logged)"
}

// apiserverRequestsAt is the replica's caddy_headless_storage_apiserver_requests_total.
func apiserverRequestsAt(admin string) float64 {
	resp, err := http.Get(admin + "/metrics")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	sum := 0.0
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "caddy_headless_storage_apiserver_requests_total{") {
			var v float64
			fmt.Sscan(line[strings.LastIndexByte(line, ' ')+1:], &v)
			sum += v
		}
	}
	return sum
}

// pkiLockHolder is the holder of the Lease of the pair whose key is key.
// The lock is named pki_<ca>_<root|intermediate> (kubestore/pki.go).
func (s *suite) pkiLockHolder(t *testing.T, ns, token, prefix, key string) string {
	t.Helper()
	c := s.storageConfig(ns, token)
	c.Prefix, c.Identity = prefix, "pki-observer"
	st, err := kubestore.New(c, nil)
	if err != nil {
		t.Fatal(err)
	}
	kind := strings.TrimSuffix(filepath.Base(key), ".key")
	h, err := st.Holder(context.Background(), "pki_local_"+kind)
	if err != nil {
		t.Fatalf("reading the Lease of %s: %v", key, err)
	}
	return h
}

// stallProxy forwards one replica's apiserver requests. While armed (one
// flag for the three proxies), the first Secret write whose body names key
// is held back until the replica is gone, and the proxy's index is sent
// on stalled.
type stallProxy struct {
	url   string
	index int
	armed *atomic.Bool
	mu    sync.Mutex
	key   string
	fwd   *httputil.ReverseProxy
	out   chan<- int
}

func (s *suite) newStallProxy(t *testing.T, index int, armed *atomic.Bool, stalled chan<- int) *stallProxy {
	t.Helper()
	api, err := url.Parse(s.apiURL)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(s.ca.cert)
	fwd := httputil.NewSingleHostReverseProxy(api)
	fwd.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := s.ca.issue(certFile, keyFile); err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	p := &stallProxy{url: "https://" + ln.Addr().String(), index: index, armed: armed, fwd: fwd, out: stalled}
	srv := &http.Server{Handler: p}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return p
}

func (p *stallProxy) setKey(k string) {
	p.mu.Lock()
	p.key = k
	p.mu.Unlock()
}

func (p *stallProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if p.armed.Load() && (r.Method == http.MethodPost || r.Method == http.MethodPut) && strings.Contains(r.URL.Path, "/secrets") {
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body))
		p.mu.Lock()
		key := p.key
		p.mu.Unlock()
		if bytes.Contains(body, []byte(`"`+key+`"`)) && p.armed.CompareAndSwap(true, false) {
			p.out <- p.index
			<-r.Context().Done() // the replica is killed while it waits
			return
		}
	}
	p.fwd.ServeHTTP(w, r)
}
