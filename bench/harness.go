package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
	"github.com/caddy-headless/caddy-headless/internal/proc"
)

const (
	host     = "127.0.6.1"     // DNS, proxies and admin endpoints listen here
	dnsAddr  = host + ":10553" // the cluster DNS stand-in
	epPort   = "18080"         // every endpoint's port
	domain   = "bench.svc.cluster.local"
	appName  = "app." + domain // the Service most drills proxy to
	zoneTTL  = 5               // CoreDNS kubernetes plugin's default TTL
	basePort = 18100           // proxies listen from here up, admin endpoints from basePort+100
)

// epAddr is the i-th endpoint address: 127.0.6.<i>:18080.
func epAddr(i int) string { return fmt.Sprintf("127.0.6.%d:%s", i, epPort) }

// harness owns everything a drill starts: the DNS stand-in, the endpoints and
// the proxies; stopAll ends what a drill left running.
type harness struct {
	dir    string
	caddy  string
	source string // what caddy was built from
	quick  bool
	dns    *dnstest.Server

	mu        sync.Mutex
	zone      map[string][]string // name → A addresses (IPs)
	endpoints map[string]*endpoint
	proxies   []*proxy
	nextPort  int
	head      map[string]map[string]string // headline row → column → value
	headRows  []string
}

func newHarness(caddyBin string, quick bool) (*harness, error) {
	abs, err := filepath.Abs(caddyBin)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(abs); err != nil {
		return nil, fmt.Errorf("%s: %w (make build)", caddyBin, err)
	}
	dir, err := os.MkdirTemp("", "headless-bench-")
	if err != nil {
		return nil, err
	}
	// A copy, so a rebuild of bin/caddy during the run changes nothing.
	bin := filepath.Join(dir, "caddy")
	if err := copyFile(abs, bin); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	srv, err := dnstest.Listen(dnsAddr, "")
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("DNS stand-in on %s: %w", dnsAddr, err)
	}
	return &harness{dir: dir, caddy: bin, quick: quick, dns: srv,
		zone: map[string][]string{}, endpoints: map[string]*endpoint{}, nextPort: basePort}, nil
}

func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, b, 0o755)
}

// dur is d, or a tenth of it (at least 1s) with -quick.
func (h *harness) dur(d time.Duration) time.Duration {
	if h.quick {
		return max(d/10, time.Second)
	}
	return d
}

func (h *harness) close() {
	h.stopAll()
	h.dns.Close()
	os.RemoveAll(h.dir)
}

// stopAll stops every proxy and endpoint and empties the zone.
func (h *harness) stopAll() {
	h.mu.Lock()
	proxies, eps := h.proxies, h.endpoints
	h.proxies, h.endpoints = nil, map[string]*endpoint{}
	h.zone = map[string][]string{}
	h.mu.Unlock()
	for _, p := range proxies {
		p.stop()
	}
	for _, e := range eps {
		e.stop(0)
	}
	h.dns.Mute(false)
	h.publish()
}

// --- DNS ---------------------------------------------------------------------

// setRecords makes name answer with the addresses of eps (ip:port or ip), or
// NXDOMAIN when there are none, and serves the change at once.
func (h *harness) setRecords(name string, eps ...string) {
	var ips []string
	for _, e := range eps {
		if ip, _, err := net.SplitHostPort(e); err == nil {
			e = ip
		}
		ips = append(ips, e)
	}
	h.mu.Lock()
	if len(ips) == 0 {
		delete(h.zone, name)
	} else {
		h.zone[name] = ips
	}
	h.mu.Unlock()
	h.publish()
}

func (h *harness) publish() {
	h.mu.Lock()
	var b strings.Builder
	for name, ips := range h.zone {
		for _, ip := range ips {
			fmt.Fprintf(&b, "%s. %d IN A %s\n", name, zoneTTL, ip)
		}
	}
	h.mu.Unlock()
	if err := h.dns.Set(b.String()); err != nil {
		panic(err) // the harness wrote a bad zone
	}
}

// --- endpoints ---------------------------------------------------------------

// endpoint is an HTTP server at one address that says who it is and remembers
// when it was first and last asked (Unix nanoseconds), since reset.
type endpoint struct {
	addr        string
	srv         *http.Server
	first, last atomic.Int64
	hits        atomic.Int64
	stopped     atomic.Bool
}

func (h *harness) startEndpoint(addr string) (*endpoint, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("endpoint %s: %w", addr, err)
	}
	e := &endpoint{addr: addr}
	body := []byte("ok " + addr + "\n")
	e.srv = &http.Server{
		ReadHeaderTimeout: 10 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			now := time.Now().UnixNano()
			e.last.Store(now)
			e.first.CompareAndSwap(0, now)
			e.hits.Add(1)
			w.Header().Set("X-Endpoint", addr)
			w.Header().Set("Content-Type", "text/plain")
			w.Write(body)
		}),
	}
	go e.srv.Serve(l)
	h.mu.Lock()
	h.endpoints[addr] = e
	h.mu.Unlock()
	return e, nil
}

func (h *harness) startEndpoints(addrs ...string) ([]*endpoint, error) {
	var eps []*endpoint
	for _, a := range addrs {
		e, err := h.startEndpoint(a)
		if err != nil {
			return nil, err
		}
		eps = append(eps, e)
	}
	return eps, nil
}

func (e *endpoint) reset() { e.first.Store(0); e.last.Store(0); e.hits.Store(0) }

// stop shuts the server down gracefully within grace (in-flight requests
// finish, idle keep-alive connections are closed), then closes what is left.
func (e *endpoint) stop(grace time.Duration) {
	if e.stopped.Swap(true) {
		return
	}
	if grace > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), grace)
		e.srv.Shutdown(ctx)
		cancel()
	}
	e.srv.Close()
}

// --- proxies -----------------------------------------------------------------

// proxy is a peer running as a child process of the harness.
type proxy struct {
	*proc.Process
	name  string
	url   string // http://127.0.6.1:port/
	admin string // Caddy's admin address, host:port
	log   string
}

func (h *harness) ports() (listen, admin string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	p := h.nextPort
	h.nextPort++
	return fmt.Sprintf("%s:%d", host, p), fmt.Sprintf("%s:%d", host, p+100)
}

func (h *harness) spawn(name, listen string, args ...string) (*proxy, error) {
	slug := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
			return r
		}
		return '-'
	}, name)
	logPath := filepath.Join(h.dir, fmt.Sprintf("%d-%s.log", time.Now().UnixNano(), slug))
	pr, err := proc.Start(name, h.dir, logPath,
		[]string{"HOME=" + h.dir, "XDG_DATA_HOME=" + h.dir + "/data", "XDG_CONFIG_HOME=" + h.dir + "/config"}, args[0], args[1:]...)
	if err != nil {
		return nil, err
	}
	p := &proxy{Process: pr, name: name, url: "http://" + listen + "/", log: logPath}
	h.mu.Lock()
	h.proxies = append(h.proxies, p)
	h.mu.Unlock()
	return p, nil
}

// stop ends the proxy's process group (nginx and HAProxy workers included):
// SIGTERM, then SIGKILL after 5s.
func (p *proxy) stop() { p.Stop(5 * time.Second) }

// waitReady polls path until it answers 200 (or 503/502 are fine when ok200 is false).
func (p *proxy) waitReady(ctx context.Context, path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	c := &http.Client{Timeout: 2 * time.Second}
	var last string
	for time.Now().Before(deadline) {
		select {
		case <-p.Done():
			return fmt.Errorf("%s exited: %s", p.name, tail(p.log, 10))
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		resp, err := c.Get(strings.TrimSuffix(p.url, "/") + path)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready within %s (last: %s): %s", p.name, timeout, last, tail(p.log, 10))
}

func tail(path string, n int) string { return proc.Tail(path, n, "") }

// --- Caddy ---------------------------------------------------------------------

// upstreamOpts are the settings of Caddyfile.example's bbs_upstream snippet:
// the story's headers, keep-alive, and the passive health checks and retries
// the README recommends in place of nginx's max_fails=2 fail_timeout=3s.
const upstreamOpts = `		header_up X-Real-IP {remote_host}
		max_fails 2
		fail_duration 3s
		lb_try_duration 3s
		transport http {
			keepalive 120s
			keepalive_idle_conns_per_host 32
		}
`

// allowLoopback lets DNS name the endpoints of the bench, on 127.0.6.x:
// loopback endpoints are refused unless allowed.
const allowLoopback = "allow_addresses loopback"

// Caddy site bodies for the Service `app`.
func ourProxy(extra string) string { return ourProxyFor(appName, extra) }

func dynamicA(refresh string) string { return dynamicAFor(appName, refresh) }

// Caddy site bodies for the Service name.
func ourProxyFor(name, extra string) string {
	return fmt.Sprintf("\theadless_proxy %s:%s {\n\t\tresolvers %s\n\t\t"+allowLoopback+"\n%s%s\t}\n", name, epPort, dnsAddr, extra, upstreamOpts)
}

func dynamicAFor(name, refresh string) string {
	r := ""
	if refresh != "" {
		r = "\t\t\t\trefresh " + refresh + "\n"
	}
	return fmt.Sprintf("\treverse_proxy {\n\t\tdynamic a %s %s {\n\t\t\t\tresolvers %s\n%s\t\t}\n%s\t}\n", name, epPort, dnsAddr, r, upstreamOpts)
}

func staticProxy(eps ...string) string {
	return fmt.Sprintf("\treverse_proxy %s {\n%s\t}\n", strings.Join(eps, " "), upstreamOpts)
}

func caddyfile(listen, admin, body string) string {
	return fmt.Sprintf(`{
	admin %[1]s {
		origins %[1]s
	}
	auto_https off
	persist_config off
	log {
		level ERROR
	}
}

http://:%[2]s {
	bind %[3]s
%[4]s}
`, admin, portOf(listen), host, body)
}

func portOf(addr string) string { _, p, _ := net.SplitHostPort(addr); return p }

// startCaddy runs bin/caddy with a site whose body is given, and waits until
// readyPath answers 200.
func (h *harness) startCaddy(ctx context.Context, name, body, readyPath string) (*proxy, error) {
	listen, admin := h.ports()
	cfg := filepath.Join(h.dir, fmt.Sprintf("Caddyfile.%s", portOf(listen)))
	if err := os.WriteFile(cfg, []byte(caddyfile(listen, admin, body)), 0o644); err != nil {
		return nil, err
	}
	p, err := h.spawn(name, listen, h.caddy, "run", "--config", cfg, "--adapter", "caddyfile")
	if err != nil {
		return nil, err
	}
	p.admin = admin
	if readyPath == "" { // no site check: the admin endpoint answering is enough
		var err error
		for i := 0; i < 300; i++ {
			if _, err = p.metrics(); err == nil {
				return p, nil
			}
			time.Sleep(50 * time.Millisecond)
		}
		return p, fmt.Errorf("%s: admin endpoint not answering: %v: %s", name, err, tail(p.log, 10))
	}
	return p, p.waitReady(ctx, readyPath, 30*time.Second)
}

// reload posts a Caddyfile with this body to the admin API, forcing a reload
// even when the config is unchanged.
func (p *proxy) reload(body string) error {
	listen := strings.TrimSuffix(strings.TrimPrefix(p.url, "http://"), "/")
	req, _ := http.NewRequest("POST", "http://"+p.admin+"/load", strings.NewReader(caddyfile(listen, p.admin, body)))
	req.Header.Set("Content-Type", "text/caddyfile")
	req.Header.Set("Cache-Control", "must-revalidate")
	req.Close = true // a fresh admin connection each time: a reload may close kept-alive ones
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return &loadStatusError{resp.Status, string(b)}
	}
	return nil
}

// loadStatusError is an answer of the admin API other than 200 to POST /load.
type loadStatusError struct{ status, body string }

func (e *loadStatusError) Error() string { return "POST /load: " + e.status + ": " + e.body }

// metrics scrapes Caddy's admin /metrics: the sum of every series of the
// named metric whose labels contain each of the label filters ("service=\"x\"").
func (p *proxy) metrics() (map[string]float64, error) {
	resp, err := http.Get("http://" + p.admin + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		name := line[:i]
		if j := strings.IndexByte(name, '{'); j >= 0 {
			m[name[:j]] += v // the sum over every label set
		}
		m[name] += v
	}
	return m, sc.Err()
}

// procStats are the Caddy process's resident memory and, from /metrics, its
// goroutines and in-use heap.
type procStats struct {
	rssMiB, heapMiB float64
	goroutines      int
}

func (p *proxy) stats() procStats {
	var s procStats
	s.rssMiB = rssMiB(p.Pid())
	if m, err := p.metrics(); err == nil {
		s.goroutines = int(m["go_goroutines"])
		s.heapMiB = m["go_memstats_heap_inuse_bytes"] / (1 << 20)
	}
	return s
}

// rssMiB is VmRSS of pid and its children (nginx and HAProxy workers).
func rssMiB(pid int) float64 {
	total := 0.0
	for _, p := range append([]int{pid}, children(pid)...) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p))
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
				kb, _ := strconv.ParseFloat(f[1], 64)
				total += kb / 1024
			}
		}
	}
	return total
}

func children(pid int) []int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		return nil
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if c, err := strconv.Atoi(f); err == nil {
			out = append(out, c)
		}
	}
	return out
}

// --- nginx ---------------------------------------------------------------------

// startNginx runs nginx with the story's configuration (docs/design.md), its
// upstream being the addresses given: nginx resolves names once, at start.
func (h *harness) startNginx(ctx context.Context, name string, eps []string) (*proxy, error) {
	listen, _ := h.ports()
	d := filepath.Join(h.dir, "nginx-"+portOf(listen))
	if err := os.MkdirAll(filepath.Join(d, "tmp"), 0o755); err != nil {
		return nil, err
	}
	var servers strings.Builder
	for _, e := range eps {
		fmt.Fprintf(&servers, "\t\tserver %s;\n", e)
	}
	conf := fmt.Sprintf(`user root;
worker_processes auto;
daemon off;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 8192; }
http {
	access_log off;
	client_body_temp_path %[1]s/tmp/body;
	proxy_temp_path %[1]s/tmp/proxy;
	fastcgi_temp_path %[1]s/tmp/fastcgi;
	uwsgi_temp_path %[1]s/tmp/uwsgi;
	scgi_temp_path %[1]s/tmp/scgi;
	upstream frontend {
%[2]s		keepalive 32;
	}
	server {
		listen %[3]s;
		client_max_body_size 200m;
		proxy_http_version 1.1;
		proxy_set_header Connection "";
		proxy_set_header Host $host;
		proxy_set_header X-Real-IP $remote_addr;
		proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
		proxy_set_header X-Forwarded-Proto $scheme;
		proxy_connect_timeout 300s;
		proxy_send_timeout 300s;
		proxy_read_timeout 300s;
		proxy_buffer_size 128k;
		proxy_buffers 4 256k;
		proxy_busy_buffers_size 256k;
		location / { proxy_pass http://frontend; }
	}
}
`, d, servers.String(), listen)
	cfg := filepath.Join(d, "nginx.conf")
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	p, err := h.spawn(name, listen, "nginx", "-p", d, "-c", cfg, "-e", filepath.Join(d, "error.log"))
	if err != nil {
		return nil, err
	}
	return p, p.waitReady(ctx, "/", 15*time.Second)
}

// --- HAProxy -------------------------------------------------------------------

// startHAProxy runs HAProxy with its DNS discovery (resolvers +
// server-template) for the Service app, re-resolving every holdValid.
func (h *harness) startHAProxy(ctx context.Context, name, holdValid string, slots int) (*proxy, error) {
	listen, _ := h.ports()
	conf := fmt.Sprintf(`global
	nbthread 2
	maxconn 8000
defaults
	mode http
	timeout connect 3s
	timeout client 300s
	timeout server 300s
	retries 3
	option redispatch 1
resolvers cluster
	nameserver dns %[1]s
	accepted_payload_size 8192
	timeout resolve 1s
	timeout retry 1s
	hold valid %[2]s
frontend fe
	bind %[3]s
	default_backend app
backend app
	balance roundrobin
	option forwardfor
	http-request set-header X-Real-IP %%[src]
	server-template ep %[4]d %[5]s:%[6]s resolvers cluster init-addr none resolve-prefer ipv4
`, dnsAddr, holdValid, listen, slots, appName, epPort)
	return h.runHAProxy(ctx, name, listen, conf)
}

// runHAProxy runs HAProxy with this configuration (its frontend bound to
// listen) and waits until it answers 200.
func (h *harness) runHAProxy(ctx context.Context, name, listen, conf string) (*proxy, error) {
	cfg := filepath.Join(h.dir, "haproxy-"+portOf(listen)+".cfg")
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	p, err := h.spawn(name, listen, "haproxy", "-db", "-f", cfg)
	if err != nil {
		return nil, err
	}
	return p, p.waitReady(ctx, "/", 15*time.Second)
}

// --- versions --------------------------------------------------------------------

func versionOf(args ...string) string {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil && len(out) == 0 {
		return "not found"
	}
	line := strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	return line
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "model name") {
			if _, v, ok := strings.Cut(l, ":"); ok {
				return strings.TrimSpace(v)
			}
		}
	}
	return "unknown"
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
