package integration

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func (s *suite) startEtcd() error {
	client, err := freePort()
	if err != nil {
		return err
	}
	peer, err := freePort()
	if err != nil {
		return err
	}
	cu := fmt.Sprintf("http://127.0.0.1:%d", client)
	pu := fmt.Sprintf("http://127.0.0.1:%d", peer)
	s.etcd, err = startProcess(s.dir, "etcd", nil, s.tool("etcd"),
		"--name=e2e",
		"--data-dir="+filepath.Join(s.dir, "etcd-data"),
		"--listen-client-urls="+cu, "--advertise-client-urls="+cu,
		"--listen-peer-urls="+pu, "--initial-advertise-peer-urls="+pu,
		"--initial-cluster=e2e="+pu,
		"--unsafe-no-fsync",
		"--log-level=warn",
	)
	if err != nil {
		return err
	}
	s.etcdURL = cu
	return waitFor(30*time.Second, 200*time.Millisecond, func() error {
		if s.etcd.exited() {
			return fmt.Errorf("etcd exited: %v", s.etcd.Err())
		}
		return httpOK(http.DefaultClient, cu+"/health", "")
	})
}

func (s *suite) startAPIServer() error {
	port, err := freePort()
	if err != nil {
		return err
	}
	d := filepath.Join(s.dir, "apiserver")
	if err := os.MkdirAll(d, 0o755); err != nil {
		return err
	}
	cert, key := filepath.Join(d, "serving.pem"), filepath.Join(d, "serving-key.pem")
	if err := s.ca.issue(cert, key); err != nil {
		return err
	}
	saKey, saPub := filepath.Join(d, "sa-key.pem"), filepath.Join(d, "sa.pub")
	if err := writeServiceAccountKeys(saKey, saPub); err != nil {
		return err
	}
	tokens := filepath.Join(d, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(adminToken+`,e2e-admin,e2e-admin,"system:masters"`+"\n"), 0o600); err != nil {
		return err
	}
	s.apiArgs = []string{
		"--etcd-servers=" + s.etcdURL,
		"--bind-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", port),
		"--advertise-address=10.231.255.254",
		"--cert-dir=" + d,
		"--tls-cert-file=" + cert, "--tls-private-key-file=" + key,
		"--client-ca-file=" + s.caFile,
		"--token-auth-file=" + tokens,
		"--authorization-mode=RBAC", // storage k8s is tested as a service account bound to exactly its Role
		"--service-account-key-file=" + saPub,
		"--service-account-signing-key-file=" + saKey,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range=10.231.240.0/24",
		"--endpoint-reconciler-type=none",
		"--enable-priority-and-fairness=false",
		"--watch-cache=true",
	}
	s.apiURL = fmt.Sprintf("https://127.0.0.1:%d", port)
	if err := s.runAPIServer(); err != nil {
		return err
	}
	s.kubeconfig = filepath.Join(s.dir, "kubeconfig")
	if err := s.writeKubeconfig(s.kubeconfig, "e2e-admin", adminToken, ""); err != nil {
		return err
	}
	// The default namespace is made by the apiserver's own bootstrap
	// controller; wait for it so that kubectl sees a settled cluster.
	return waitFor(30*time.Second, 500*time.Millisecond, func() error {
		_, err := run(s.tool("kubectl"), "--kubeconfig", s.kubeconfig, "get", "namespace", "default")
		return err
	})
}

func (s *suite) startCoreDNS() error {
	var err error
	if s.dnsPort, err = freePort(); err != nil {
		return err
	}
	if s.dnsReady, err = freePort(); err != nil {
		return err
	}
	health, err := freePort()
	if err != nil {
		return err
	}
	s.corefile = filepath.Join(s.dir, "Corefile")
	cf := fmt.Sprintf(`test.com:%[1]d {
	bind 127.0.0.1
	errors
	log
	hosts {
		127.0.0.1 %[5]s
		127.0.0.12 `+replicaSite+` `+replicaSite2+`
	}
}

cluster.local:%[1]d {
	bind 127.0.0.1
	errors
	log
	health 127.0.0.1:%[2]d
	ready 127.0.0.1:%[3]d
	kubernetes cluster.local {
		kubeconfig %[4]s e2e
		ttl 30
	}
}
`, s.dnsPort, health, s.dnsReady, s.kubeconfig, site)
	if err := os.WriteFile(s.corefile, []byte(cf), 0o644); err != nil {
		return err
	}
	return s.runCoreDNS()
}

// writeKubeconfig writes a kubeconfig for the suite's apiserver that
// authenticates as user with token, in namespace ns ("" for default).
func (s *suite) writeKubeconfig(path, user, token, ns string) error {
	if ns != "" {
		ns = "\n    namespace: " + ns
	}
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: %s
  user:
    token: %s
contexts:
- name: e2e
  context:
    cluster: e2e
    user: %s%s
current-context: e2e
`, s.apiURL, s.caFile, user, token, user, ns)
	return os.WriteFile(path, []byte(kc), 0o600)
}

// runAPIServer starts kube-apiserver (again: same port, same etcd) and waits
// until it is ready.
func (s *suite) runAPIServer() error {
	var err error
	if s.apiSrv, err = startProcess(s.dir, "kube-apiserver", nil, s.tool("kube-apiserver"), s.apiArgs...); err != nil {
		return err
	}
	c := s.httpsClient()
	return waitFor(120*time.Second, 500*time.Millisecond, func() error {
		if s.apiSrv.exited() {
			return fmt.Errorf("kube-apiserver exited: %v", s.apiSrv.Err())
		}
		return httpOK(c, s.apiURL+"/readyz", adminToken)
	})
}

// runCoreDNS starts CoreDNS (again) with the suite's Corefile and waits until
// its kubernetes plugin has synced.
func (s *suite) runCoreDNS() error {
	var err error
	s.coredns, err = startProcess(s.dir, "coredns", nil, s.tool("coredns"), "-conf", s.corefile)
	if err != nil {
		return err
	}
	return waitFor(60*time.Second, 200*time.Millisecond, func() error {
		if s.coredns.exited() {
			return fmt.Errorf("CoreDNS exited: %v\n%s", s.coredns.Err(), s.coredns.tail(20))
		}
		return httpOK(http.DefaultClient, fmt.Sprintf("http://127.0.0.1:%d/ready", s.dnsReady), "")
	})
}

func (s *suite) dnsAddr() string { return fmt.Sprintf("127.0.0.1:%d", s.dnsPort) }

func (s *suite) startPebble() error {
	var err error
	if s.pebblePort, err = freePort(); err != nil {
		return err
	}
	if s.pebbleMgmt, err = freePort(); err != nil {
		return err
	}
	d := filepath.Join(s.dir, "pebble")
	if err := os.MkdirAll(d, 0o755); err != nil {
		return err
	}
	cert, key := filepath.Join(d, "cert.pem"), filepath.Join(d, "key.pem")
	if err := s.ca.issue(cert, key); err != nil {
		return err
	}
	cfg := map[string]any{"pebble": map[string]any{
		"listenAddress":           fmt.Sprintf("127.0.0.1:%d", s.pebblePort),
		"managementListenAddress": fmt.Sprintf("127.0.0.1:%d", s.pebbleMgmt),
		"certificate":             cert,
		"privateKey":              key,
		// Pebble validates HTTP-01 and TLS-ALPN-01 challenges against
		// where the suite's Caddy listens.
		"httpPort":                       s.httpPort,
		"tlsPort":                        s.httpsPort,
		"ocspResponderURL":               "",
		"externalAccountBindingRequired": false,
		"retryAfter":                     map[string]any{"authz": 1, "order": 1},
		"keyAlgorithm":                   "ecdsa",
		"profiles": map[string]any{"default": map[string]any{
			"description": "default", "validityPeriod": 7776000,
		}},
	}}
	b, _ := json.MarshalIndent(cfg, "", "  ")
	cfgPath := filepath.Join(d, "pebble-config.json")
	if err := os.WriteFile(cfgPath, b, 0o644); err != nil {
		return err
	}
	// Real validation: PEBBLE_VA_ALWAYS_VALID must not be set. No random
	// validation delay and no random nonce rejection, which only slow the
	// suite down.
	os.Unsetenv("PEBBLE_VA_ALWAYS_VALID")
	s.pebble, err = startProcess(d, "pebble", []string{"PEBBLE_VA_NOSLEEP=1", "PEBBLE_WFE_NONCEREJECT=0"},
		s.tool("pebble"), "-config", cfgPath, "-dnsserver", s.dnsAddr())
	if err != nil {
		return err
	}
	c := s.httpsClient()
	if err := waitFor(30*time.Second, 200*time.Millisecond, func() error {
		if s.pebble.exited() {
			return fmt.Errorf("Pebble exited: %v", s.pebble.Err())
		}
		return httpOK(c, s.acmeDirectory(), "")
	}); err != nil {
		return err
	}
	resp, err := c.Get(fmt.Sprintf("https://127.0.0.1:%d/roots/0", s.pebbleMgmt))
	if err != nil {
		return fmt.Errorf("fetching Pebble's root: %w", err)
	}
	defer resp.Body.Close()
	root, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	s.pebbleRoots = x509.NewCertPool()
	if !s.pebbleRoots.AppendCertsFromPEM(root) {
		return fmt.Errorf("Pebble's /roots/0 is not PEM: %q", root)
	}
	return nil
}

func (s *suite) acmeDirectory() string {
	return fmt.Sprintf("https://127.0.0.1:%d/dir", s.pebblePort)
}

// pebbleIssued reports whether cert chains to Pebble's root.
func (s *suite) pebbleIssued(state *tls.ConnectionState) error {
	if len(state.PeerCertificates) == 0 {
		return fmt.Errorf("no peer certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range state.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := state.PeerCertificates[0].Verify(x509.VerifyOptions{DNSName: site, Roots: s.pebbleRoots, Intermediates: inter})
	return err
}

// apply runs `kubectl apply -f -` with the given manifests.
func (s *suite) apply(t *testing.T, manifests ...string) {
	t.Helper()
	in := strings.Join(manifests, "\n---\n")
	if _, err := runInput([]byte(in), s.tool("kubectl"), "--kubeconfig", s.kubeconfig, "apply", "-f", "-"); err != nil {
		t.Fatalf("kubectl apply: %v\nmanifests:\n%s", err, in)
	}
}

// namespace creates a namespace for one scenario (the control plane lives
// only as long as the run, so nothing is deleted).
func (s *suite) namespace(t *testing.T, name string) {
	t.Helper()
	s.apply(t, fmt.Sprintf("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s\n", name))
}

// headlessService is a Service without a selector and no cluster IP, with
// the given named ports (name → port).
func headlessService(ns, name string, ports map[string]int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: v1\nkind: Service\nmetadata:\n  name: %s\n  namespace: %s\nspec:\n  clusterIP: None\n  ports:\n", name, ns)
	for _, pn := range sortedKeys(ports) {
		fmt.Fprintf(&b, "  - name: %s\n    port: %d\n    targetPort: %d\n    protocol: TCP\n", pn, ports[pn], ports[pn])
	}
	return b.String()
}

// endpoint is one entry of an EndpointSlice.
type endpoint struct {
	addr     string
	hostname string // optional, StatefulSet style
	ready    bool
}

// endpointSlice is an EndpointSlice of the given Service, entered by hand as
// the users of headless Services without selectors do.
func endpointSlice(ns, service, name, family string, ports map[string]int, eps ...endpoint) string {
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: %s\n  namespace: %s\n  labels:\n    kubernetes.io/service-name: %s\naddressType: %s\nports:\n", name, ns, service, family)
	for _, pn := range sortedKeys(ports) {
		fmt.Fprintf(&b, "- name: %s\n  port: %d\n  protocol: TCP\n", pn, ports[pn])
	}
	if len(eps) == 0 {
		b.WriteString("endpoints: []\n")
		return b.String()
	}
	b.WriteString("endpoints:\n")
	for _, e := range eps {
		fmt.Fprintf(&b, "- addresses: [%q]\n  conditions:\n    ready: %t\n", e.addr, e.ready)
		if e.hostname != "" {
			fmt.Fprintf(&b, "  hostname: %s\n", e.hostname)
		}
	}
	return b.String()
}
