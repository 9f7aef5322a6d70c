package integration

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// suite is the environment every scenario shares: the control plane,
// CoreDNS, Pebble, the VMs and the Caddy binary. Each scenario starts its own
// Caddy process and uses its own namespace.
type suite struct {
	dir      string // scratch directory, removed on success
	toolsBin string
	caddyBin string

	ca      *testCA
	caFile  string // PEM of testCA: trusted for kube-apiserver and Pebble's API
	etcd    *process
	etcdURL string
	apiSrv  *process
	apiArgs []string // to restart it as it was
	apiURL  string   // https://127.0.0.1:port
	coredns *process
	pebble  *process

	kubeconfig string
	corefile   string
	dnsPort    int
	dnsReady   int

	pebblePort  int
	pebbleMgmt  int
	pebbleRoots *x509.CertPool // roots of the certificates Pebble issues

	httpPort, httpsPort int // where every Caddy of the suite listens; Pebble validates there
	storage             string

	vms []*vm
}

// site is the name Caddy serves; CoreDNS's hosts plugin maps it to
// 127.0.0.1 for Pebble's validation.
const site = "bbs.test.com"

const adminToken = "caddy-headless-e2e-admin"

var (
	env       *suite
	skipWhy   string
	setupErr  error
	toolNames = []string{"etcd", "kube-apiserver", "kubectl", "coredns", "pebble"}
)

// requireToolsEnv, set by integration/run.sh (and so by make test and CI),
// turns missing tool binaries from a skip into a failure. A bare `go test`
// in integration/ without it still skips, for a quick compile check.
const requireToolsEnv = "E2E_REQUIRE_TOOLS"

// requireSuite returns the shared environment, or skips the test when the
// tool binaries are not built and E2E_REQUIRE_TOOLS is unset (TestMain fails
// the run when it is set), or fails it when the environment could not be set
// up.
func requireSuite(t *testing.T) *suite {
	t.Helper()
	if skipWhy != "" {
		t.Skip(skipWhy)
	}
	if setupErr != nil {
		t.Fatalf("end-to-end environment not set up: %v", setupErr)
	}
	return env
}

func TestMain(m *testing.M) {
	if name := os.Getenv("E2E_VM_NAME"); name != "" {
		runVMServer(name) // never returns
	}
	if cfg := os.Getenv("E2E_LOCK_HOLDER"); cfg != "" {
		runLockHolder(cfg) // never returns
	}
	bin := os.Getenv("TOOLS_BIN")
	if bin == "" {
		home, _ := os.UserHomeDir()
		bin = filepath.Join(home, ".cache", "caddy-headless", "bin")
	}
	var missing []string
	for _, name := range toolNames {
		if _, err := os.Stat(filepath.Join(bin, name)); err != nil {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		why := fmt.Sprintf("tool binaries %v missing in %s: run integration/build-tools.sh (or integration/run.sh) first", missing, bin)
		if os.Getenv(requireToolsEnv) != "" {
			// Under integration/run.sh (make test, CI) a missing tool is a
			// failure: a suite that skips everything must not report ok.
			fmt.Fprintf(os.Stderr, "e2e: FAIL: %s (%s is set)\n", why, requireToolsEnv)
			os.Exit(1)
		}
		skipWhy = why
		os.Exit(m.Run())
	}

	s := &suite{toolsBin: bin}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		fmt.Fprintln(os.Stderr, "e2e: interrupted, tearing down")
		s.teardown(false)
		os.Exit(2)
	}()

	start := time.Now()
	if setupErr = s.setup(); setupErr != nil {
		fmt.Fprintf(os.Stderr, "e2e: setup failed: %v\n", setupErr)
		s.dumpLogs()
	} else {
		fmt.Printf("e2e: environment ready in %v (work dir %s)\n", time.Since(start).Round(time.Millisecond), s.dir)
	}
	env = s
	code := m.Run()
	if len(convergence) > 0 {
		fmt.Printf("e2e: convergence times measured (refresh %v..%v, CoreDNS ttl 30, bound %v):\n", refreshMin, refreshMax, convergeBound)
		for _, c := range convergence {
			fmt.Printf("e2e:   %s\n", c)
		}
	}
	s.teardown(code == 0 && setupErr == nil)
	os.Exit(code)
}

func (s *suite) setup() error {
	if os.Geteuid() != 0 {
		return errors.New("the suite needs root: it creates network namespaces for the VMs")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return errors.New("`ip` not found: install iproute2")
	}
	killLeftovers()
	cleanupNetns()

	var err error
	if s.dir, err = os.MkdirTemp("", "caddy-headless-e2e-"); err != nil {
		return err
	}
	if s.caddyBin, err = caddyBinary(); err != nil {
		return err
	}
	if s.ca, err = newTestCA(); err != nil {
		return err
	}
	s.caFile = filepath.Join(s.dir, "ca.pem")
	if err := os.WriteFile(s.caFile, s.ca.pem, 0o644); err != nil {
		return err
	}
	if s.httpPort, err = freePort(); err != nil {
		return err
	}
	if s.httpsPort, err = freePort(); err != nil {
		return err
	}
	s.storage = filepath.Join(s.dir, "caddy-storage")

	steps := []struct {
		name string
		fn   func() error
	}{
		{"etcd", s.startEtcd},
		{"kube-apiserver", s.startAPIServer},
		{"CoreDNS", s.startCoreDNS},
		{"Pebble", s.startPebble},
		{"VMs", s.startVMs},
	}
	for _, st := range steps {
		t0 := time.Now()
		if err := st.fn(); err != nil {
			return fmt.Errorf("%s: %w", st.name, err)
		}
		fmt.Printf("e2e: %s up in %v\n", st.name, time.Since(t0).Round(time.Millisecond))
	}
	return nil
}

// caddyBinary returns $CADDY_BIN, or the checkout's bin/caddy, built with
// xcaddy/build.sh unless it is newer than its sources (scripts/build-if-stale.sh):
// `make test` builds it once for every step that needs it.
func caddyBinary() (string, error) {
	if b := os.Getenv("CADDY_BIN"); b != "" {
		if _, err := os.Stat(b); err != nil {
			return "", fmt.Errorf("CADDY_BIN: %w", err)
		}
		return b, nil
	}
	root, err := filepath.Abs("..")
	if err != nil {
		return "", err
	}
	script := filepath.Join(root, "scripts", "build-if-stale.sh")
	out := filepath.Join(root, "bin", "caddy")
	t0 := time.Now()
	cmd := exec.Command(script, out)
	cmd.Dir = root
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr // the build's progress
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("building Caddy with %s (set CADDY_BIN to use a built one): %w", script, err)
	}
	fmt.Printf("e2e: Caddy %s ready in %v\n", out, time.Since(t0).Round(time.Second))
	return out, nil
}

func (s *suite) teardown(success bool) {
	for _, v := range s.vms {
		v.stop()
	}
	cleanupNetns()
	for _, p := range []*process{s.pebble, s.coredns, s.apiSrv, s.etcd} {
		p.stop()
	}
	// Every process of this run has ended.
	os.Remove(pidFile)
	if s.dir == "" {
		return
	}
	if success && os.Getenv("E2E_KEEP") == "" {
		os.RemoveAll(s.dir)
	} else {
		fmt.Printf("e2e: work dir with logs kept: %s\n", s.dir)
	}
}

// dumpLogs prints the tails of the control plane's logs.
func (s *suite) dumpLogs() {
	for _, p := range []*process{s.etcd, s.apiSrv, s.coredns, s.pebble} {
		if p != nil {
			fmt.Fprintf(os.Stderr, "----- %s log (%s), last lines -----\n%s\n", p.name, p.log, p.tail(40))
		}
	}
}

// tool returns the path of a built tool.
func (s *suite) tool(name string) string { return filepath.Join(s.toolsBin, name) }

// httpsClient trusts the suite's CA (kube-apiserver, Pebble's API).
func (s *suite) httpsClient() *http.Client {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(s.ca.pem)
	return &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
}

// httpOK fails unless url answers 200; token is sent as a bearer token if set.
func httpOK(c *http.Client, url, token string) error {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 2048))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	return nil
}
