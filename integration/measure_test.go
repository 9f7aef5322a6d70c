package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestMeasureSourceCost measures what `via dns` and `via api` cost the
// cluster when nothing changes, on the suite's kube-apiserver (RBAC, the
// via-api overlay's Role) and CoreDNS: for each scale in
// CHL_MEASURE_SERVICES (e.g. "500,10000"), one Caddy with that many
// headless_proxy routes, each to its own Service of two endpoints, spread
// over ten namespaces. `via dns` is measured at the first scale only (at
// 10,000 Services it is 10,000 queries a second by design). It prints
// the numbers for BENCHMARKS.md; it asserts only that every Service was
// resolved. Skipped unless set: it takes minutes per scale
// (CHL_MEASURE_WINDOW, default 330s, covers one 5-minute watch timeout;
// via dns is counted over at most a minute, its rate is steady).
func TestMeasureSourceCost(t *testing.T) {
	scales := os.Getenv("CHL_MEASURE_SERVICES")
	if scales == "" {
		t.Skip("set CHL_MEASURE_SERVICES=500,10000 to measure")
	}
	window := 330 * time.Second
	if w := os.Getenv("CHL_MEASURE_WINDOW"); w != "" {
		var err error
		if window, err = time.ParseDuration(w); err != nil {
			t.Fatal(err)
		}
	}
	s := requireSuite(t)
	vms := s.useVMs(t, 1, 2)
	const namespaces = 10
	var token string
	for k := range namespaces {
		token = s.viaAPIToken(t, fmt.Sprintf("mz-%d", k), "caddy-measure")
	}
	created := 0
	var rows []string
	for i, f := range strings.Split(scales, ",") {
		n, err := strconv.Atoi(f)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		s.createMeasureServices(t, created, n, namespaces, vms)
		created = max(created, n)
		t.Logf("%d Services and slices in place after %v", n, time.Since(start).Round(time.Second))
		sources := []string{"api"}
		if i == 0 {
			sources = []string{"dns", "api"}
		}
		for _, src := range sources {
			rows = append(rows, s.measureSource(t, n, namespaces, src, token, window))
		}
	}
	t.Logf("\n| Services | source | start → all resolved | Caddy RSS | Caddy goroutines | TCP connections to the apiserver | open endpointslice watches at the apiserver | apiserver RSS Δ | apiserver endpointslice requests/min, idle (verb: count) | DNS queries/s, idle |\n|---|---|---|---|---|---|---|---|---|---|\n%s",
		strings.Join(rows, "\n"))
}

// createMeasureServices creates Services m-from … m-(to-1) with one slice
// of two endpoints each, with server-side apply in chunks.
func (s *suite) createMeasureServices(t *testing.T, from, to, namespaces int, vms []*vm) {
	t.Helper()
	const chunk = 1000
	for lo := from; lo < to; lo += chunk {
		var docs []string
		for i := lo; i < min(lo+chunk, to); i++ {
			ns, name := fmt.Sprintf("mz-%d", i%namespaces), fmt.Sprintf("m-%d", i)
			docs = append(docs, headlessService(ns, name, map[string]int{"http": 8080}),
				condSlice(ns, name, name, 8080, ready(vms[0].v4), ready(vms[1].v4)))
		}
		if _, err := runInput([]byte(strings.Join(docs, "\n---\n")), s.tool("kubectl"), "--kubeconfig", s.kubeconfig,
			"apply", "--server-side", "-f", "-"); err != nil {
			t.Fatal(err)
		}
	}
}

// measureSource starts one Caddy on n Services through src ("dns" or
// "api"), waits until every Service is resolved, then counts over window
// what it costs the apiserver and CoreDNS. It returns a table row.
func (s *suite) measureSource(t *testing.T, n, namespaces int, src, token string, window time.Duration) string {
	t.Helper()
	opts := fmt.Sprintf("resolvers %s", s.dnsAddr())
	if src == "api" {
		opts = fmt.Sprintf("via api {\n\t\t\t\tendpoint %s\n\t\t\t\tca_file %s\n\t\t\t\ttoken_file %s\n\t\t\t}", s.apiURL, s.caFile, token)
	}
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "\thandle /m/%d/* {\n\t\theadless_proxy m-%d.mz-%d:8080 {\n\t\t\t%s\n\t\t}\n\t}\n", i, i, i%namespaces, opts)
	}
	apiRSS0 := rssKiB(s.apiSrv.Pid())
	started := time.Now()
	c := s.startCaddy(t, b.String())
	defer c.proc.stop()
	var resolvedIn time.Duration
	if err := waitFor(10*time.Minute, time.Second, func() error {
		got, err := c.resolvedWatchers()
		if err != nil {
			return err
		}
		if got < n {
			return fmt.Errorf("%d of %d Services resolved", got, n)
		}
		resolvedIn = time.Since(started)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Second)
	if src == "dns" {
		// Its rate is steady from the start; the watch timeout is api's.
		window = min(window, time.Minute)
	}
	req0 := s.endpointSliceRequests(t)
	dns0 := fileSize(s.coredns.log)
	time.Sleep(window)
	req1 := s.endpointSliceRequests(t)
	queries := s.countQueries(t, dns0, ".mz-")
	var perMin []string
	for _, verb := range []string{"LIST", "WATCH", "GET"} {
		if d := req1[verb] - req0[verb]; d > 0 || verb != "GET" {
			perMin = append(perMin, fmt.Sprintf("%s: %.1f", verb, float64(d)/window.Minutes()))
		}
	}
	goroutines, _ := c.goroutines()
	apiPort := s.apiURL[strings.LastIndex(s.apiURL, ":")+1:]
	conns := tcpConnsOf(t, c.proc.Pid(), apiPort)
	return fmt.Sprintf("| %d | via %s | %.1f s | %.0f MiB | %d | %d | %d | %+.0f MiB | %s | %.1f |",
		n, src, resolvedIn.Seconds(), float64(rssKiB(c.proc.Pid()))/1024, goroutines, conns,
		req1["open"], float64(rssKiB(s.apiSrv.Pid())-apiRSS0)/1024, strings.Join(perMin, ", "), float64(queries)/window.Seconds())
}

// resolvedWatchers counts the watchers of GET /headless/ that have endpoints.
func (c *caddy) resolvedWatchers() (int, error) {
	var ws []struct {
		Endpoints []json.RawMessage `json:"endpoints"`
	}
	if err := getJSONInto(c.admin+"/headless/", &ws); err != nil {
		return 0, err
	}
	n := 0
	for _, w := range ws {
		if len(w.Endpoints) > 0 {
			n++
		}
	}
	return n, nil
}

var (
	requestTotal = regexp.MustCompile(`^apiserver_request_total\{([^}]*)\} ([0-9.e+]+)$`)
	longRunning  = regexp.MustCompile(`^apiserver_longrunning_requests\{([^}]*)\} ([0-9.e+]+)$`)
)

// endpointSliceRequests reads the apiserver's request counters for
// endpointslices, summed per verb, and the open watches under "open".
func (s *suite) endpointSliceRequests(t *testing.T) map[string]int {
	t.Helper()
	out, err := run(s.tool("kubectl"), "--kubeconfig", s.kubeconfig, "get", "--raw", "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int{}
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if m := requestTotal.FindStringSubmatch(line); m != nil && strings.Contains(m[1], `resource="endpointslices"`) {
			v, _ := strconv.ParseFloat(m[2], 64)
			got[label(m[1], "verb")] += int(v)
		}
		if m := longRunning.FindStringSubmatch(line); m != nil && strings.Contains(m[1], `resource="endpointslices"`) && label(m[1], "verb") == "WATCH" {
			v, _ := strconv.ParseFloat(m[2], 64)
			got["open"] += int(v)
		}
	}
	return got
}

func label(labels, name string) string {
	_, rest, ok := strings.Cut(labels, name+`="`)
	if !ok {
		return ""
	}
	v, _, _ := strings.Cut(rest, `"`)
	return v
}

// countQueries counts the lines of CoreDNS's query log written after
// offset that contain sub.
func (s *suite) countQueries(t *testing.T, offset int64, sub string) int {
	t.Helper()
	f, err := os.Open(s.coredns.log)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Seek(offset, 0); err != nil {
		t.Fatal(err)
	}
	n := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if strings.Contains(sc.Text(), sub) {
			n++
		}
	}
	return n
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// rssKiB is a process's resident set size in KiB (0 if unknown).
func rssKiB(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kib, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return kib
		}
	}
	return 0
}

// tcpConnsOf counts pid's established TCP connections to port on loopback.
func tcpConnsOf(t *testing.T, pid int, port string) int {
	t.Helper()
	out, err := run("ss", "-Htnp", "state", "established", "dst", "127.0.0.1:"+port)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(out, fmt.Sprintf("pid=%d,", pid))
}
