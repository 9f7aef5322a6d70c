package integration

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// caddy is one Caddy process of a scenario.
type caddy struct {
	s     *suite
	proc  *process
	admin string // http://127.0.0.1:port
	dir   string
	// storage is the certificate storage directory of this Caddy.
	storage string
}

// caddyfile puts the global options of the suite (admin on loopback, the
// suite's ports, Pebble as the ACME CA, the given certificate storage) in
// front of sites, the rest of a Caddyfile.
func (s *suite) caddyfile(adminPort int, storage, sites string) string {
	return fmt.Sprintf(`{
	admin 127.0.0.1:%d
	http_port %d
	https_port %d
	acme_ca %s
	acme_ca_root %s
	email e2e@%s
	storage file_system %s
	skip_install_trust
}

%s`, adminPort, s.httpPort, s.httpsPort, s.acmeDirectory(), s.caFile, site, storage, sites)
}

// siteBlock is the site block of bbs.test.com with the given body.
func siteBlock(body string) string {
	return site + " {\n" + body + "}\n"
}

// headlessOpts are the options of `dynamic headless` every scenario uses:
// the suite's CoreDNS and refresh bounds of 1 s and 2 s (CoreDNS's TTL is
// kubeadm's 30 s).
func (s *suite) headlessOpts() string {
	return fmt.Sprintf("resolvers %s\n\t\t\tcluster_domain cluster.local\n\t\t\trefresh %s %s",
		s.dnsAddr(), refreshMin, refreshMax)
}

const (
	refreshMin = time.Second
	refreshMax = 2 * time.Second
	// convergeBound is the longest a change in the cluster may take to
	// reach Caddy: one refresh interval (at most refreshMax, plus jitter),
	// a retry, and a generous allowance for a loaded CI machine.
	convergeBound = 3*refreshMax + 5*time.Second
)

// startCaddy starts Caddy with the given body of the bbs.test.com site and
// waits until it serves HTTPS with a certificate from Pebble. Its log is
// printed if the test fails.
func (s *suite) startCaddy(t *testing.T, siteBody string) *caddy {
	t.Helper()
	return s.startCaddyWith(t, s.storage, nil, siteBlock(siteBody))
}

// startCaddyWith is startCaddy with the given certificate storage, extra
// environment and site blocks.
func (s *suite) startCaddyWith(t *testing.T, storage string, env []string, sites string) *caddy {
	t.Helper()
	adminPort, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp(s.dir, "caddy-"+strings.ReplaceAll(t.Name(), "/", "_")+"-")
	if err != nil {
		t.Fatal(err)
	}
	cf := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cf, []byte(s.caddyfile(adminPort, storage, sites)), 0o644); err != nil {
		t.Fatal(err)
	}
	p, err := startProcess(dir, "caddy", append([]string{"HOME=" + dir, "XDG_DATA_HOME=" + dir, "XDG_CONFIG_HOME=" + dir}, env...),
		s.caddyBin, "run", "--config", cf, "--adapter", "caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	c := &caddy{s: s, proc: p, admin: fmt.Sprintf("http://127.0.0.1:%d", adminPort), dir: dir, storage: storage}
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("----- Caddy log (%s), last lines without admin requests -----\n%s", p.log, tailFiltered(p.log, 60, `"received request"`))
			t.Logf("----- CoreDNS log (%s), last lines -----\n%s", s.coredns.log, s.coredns.tail(30))
		}
	})
	if err := waitFor(20*time.Second, 100*time.Millisecond, func() error {
		if p.exited() {
			return fmt.Errorf("Caddy exited: %v", p.Err())
		}
		return httpOK(http.DefaultClient, c.admin+"/config/", "")
	}); err != nil {
		t.Fatalf("Caddy's admin API did not come up: %v\nCaddyfile:\n%s", err, s.caddyfile(adminPort, storage, sites))
	}
	// Wait for the certificate: the handshake only succeeds with one that
	// chains to Pebble's root.
	if err := waitFor(90*time.Second, 250*time.Millisecond, func() error {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp",
			fmt.Sprintf("127.0.0.1:%d", s.httpsPort), &tls.Config{ServerName: site, RootCAs: s.pebbleRoots})
		if err != nil {
			return err
		}
		conn.Close()
		return nil
	}); err != nil {
		t.Fatalf("Caddy did not get a certificate for %s from Pebble: %v", site, err)
	}
	return c
}

// client is an HTTPS client of the site: it connects to Caddy on loopback and
// trusts only Pebble's root.
func (s *suite) client() *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: s.transport()}
}

func (s *suite) transport() *http.Transport {
	addr := fmt.Sprintf("127.0.0.1:%d", s.httpsPort)
	d := &net.Dialer{Timeout: 5 * time.Second}
	return &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		},
		ForceAttemptHTTP2:   true,
		TLSClientConfig:     &tls.Config{ServerName: site, RootCAs: s.pebbleRoots},
		MaxIdleConnsPerHost: 8,
	}
}

// response is one answer through Caddy.
type response struct {
	status int
	body   string
	reply  vmReply // set when a VM answered
	header http.Header
	tls    *tls.ConnectionState
}

// get requests path from the site.
func (s *suite) get(c *http.Client, path string) (response, error) {
	resp, err := c.Get("https://" + site + path)
	if err != nil {
		return response{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return response{}, fmt.Errorf("GET %s: reading body: %w", path, err)
	}
	r := response{status: resp.StatusCode, body: string(b), header: resp.Header, tls: resp.TLS}
	if resp.StatusCode == http.StatusOK && strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		if err := json.Unmarshal(b, &r.reply); err != nil {
			return r, fmt.Errorf("GET %s: VM reply: %w: %q", path, err, b)
		}
	}
	return r, nil
}

// mustGet requests path and fails the test unless a VM answered 200.
func (s *suite) mustGet(t *testing.T, c *http.Client, path string) vmReply {
	t.Helper()
	r, err := s.get(c, path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	if r.status != http.StatusOK || r.reply.VM == "" {
		t.Fatalf("GET %s: want 200 from a VM, got %d: %q", path, r.status, r.body)
	}
	return r.reply
}

// spread sends n requests to path and counts the answers per VM; every
// request must be answered 200 by a VM.
func (s *suite) spread(t *testing.T, c *http.Client, path string, n int) map[string]int {
	t.Helper()
	seen := map[string]int{}
	for range n {
		seen[s.mustGet(t, c, path).VM]++
	}
	return seen
}

// load sends requests to path without pause from workers goroutines until
// stopped, and counts failures (anything but a 200 from a VM).
type load struct {
	total, failed int
	errs          []string
	perVM         map[string]int
	// retryConnErrors makes a request that failed without an HTTP answer
	// (the connection to Caddy closed) be sent once more, as a browser
	// does; retried counts those, and the retry must succeed.
	retryConnErrors bool
	retried         []string
	mu              sync.Mutex
	stop            chan struct{}
	wg              sync.WaitGroup
}

func (s *suite) startLoad(c *http.Client, path string, workers int) *load {
	return s.startLoadRetry(c, path, workers, false)
}

func (s *suite) startLoadRetry(c *http.Client, path string, workers int, retryConnErrors bool) *load {
	l := &load{stop: make(chan struct{}), perVM: map[string]int{}, retryConnErrors: retryConnErrors}
	for range workers {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				r, err := s.get(c, path)
				if err != nil && l.retryConnErrors {
					l.mu.Lock()
					l.retried = append(l.retried, fmt.Sprintf("%s: %v", time.Now().Format("15:04:05.000"), err))
					l.mu.Unlock()
					r, err = s.get(c, path)
				}
				l.mu.Lock()
				l.total++
				switch {
				case err != nil:
					l.failed++
					l.errs = append(l.errs, fmt.Sprintf("%s: %v", time.Now().Format("15:04:05.000"), err))
				case r.status != http.StatusOK || r.reply.VM == "":
					l.failed++
					l.errs = append(l.errs, fmt.Sprintf("%s: %d %q", time.Now().Format("15:04:05.000"), r.status, r.body))
				default:
					l.perVM[r.reply.VM]++
				}
				l.mu.Unlock()
				time.Sleep(10 * time.Millisecond)
			}
		}()
	}
	return l
}

// end stops the load and fails the test if any request failed.
func (l *load) end(t *testing.T, what string) {
	t.Helper()
	close(l.stop)
	l.wg.Wait()
	t.Logf("%s: %d requests, %d failed, per VM %v", what, l.total, l.failed, l.perVM)
	if len(l.retried) > 0 {
		t.Logf("%s: %d requests sent again after the connection to Caddy closed without an answer:\n%s", what, len(l.retried), strings.Join(l.retried, "\n"))
	}
	if l.total == 0 {
		t.Fatalf("%s: no requests were sent", what)
	}
	if l.failed > 0 {
		errs := l.errs
		if len(errs) > 10 {
			errs = errs[:10]
		}
		t.Fatalf("%s: %d of %d requests failed; first failures:\n%s", what, l.failed, l.total, strings.Join(errs, "\n"))
	}
}

// load posts a Caddyfile with the given body of the bbs.test.com site to the
// admin API's /load.
func (c *caddy) load(siteBody string) error {
	req, err := http.NewRequest(http.MethodPost, c.admin+"/load", bytes.NewReader([]byte(c.s.caddyfile(c.adminPort(), c.storage, siteBlock(siteBody)))))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("POST /load: %s: %s", resp.Status, b)
	}
	return nil
}

// adminPort is the port of the admin API.
func (c *caddy) adminPort() int {
	p, _ := strconv.Atoi(c.admin[strings.LastIndex(c.admin, ":")+1:])
	return p
}

var goroutineTotal = regexp.MustCompile(`goroutine profile: total (\d+)`)

// goroutines returns the number of goroutines in Caddy, from its admin API's
// /debug/pprof/goroutine.
func (c *caddy) goroutines() (int, error) {
	resp, err := http.Get(c.admin + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	m := goroutineTotal.FindSubmatch(b)
	if m == nil {
		return 0, fmt.Errorf("no goroutine total in /debug/pprof/goroutine: %.200q", b)
	}
	return strconv.Atoi(string(m[1]))
}

// goroutineDump returns the full goroutine dump, for failure messages.
func (c *caddy) goroutineDump() string {
	resp, err := http.Get(c.admin + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// logLines returns Caddy's log lines (JSON, one per line) that contain all
// of the given substrings.
func (c *caddy) logLines(subs ...string) []string {
	b, _ := os.ReadFile(c.proc.log)
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		ok := true
		for _, sub := range subs {
			if !strings.Contains(line, sub) {
				ok = false
				break
			}
		}
		if ok && line != "" {
			out = append(out, line)
		}
	}
	return out
}
