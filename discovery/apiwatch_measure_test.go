package discovery

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-headless/caddy-headless/kubeapi/apitest"
)

// TestMeasureAPIWatchers measures per-Service watches at the scales named
// in CHL_MEASURE_API (e.g. "500,10000"): connections, heap, goroutines,
// time to list everything, and the events handled for one change per
// Service. The fake apiserver runs in this process (HTTP/2, as
// kube-apiserver), so heap and goroutines include its side of every
// stream: an upper bound of the proxy's own cost. Skipped unless set.
func TestMeasureAPIWatchers(t *testing.T) {
	scales := os.Getenv("CHL_MEASURE_API")
	if scales == "" {
		t.Skip("set CHL_MEASURE_API=500,10000 to measure")
	}
	for _, f := range strings.Split(scales, ",") {
		n, err := strconv.Atoi(f)
		if err != nil {
			t.Fatal(err)
		}
		measureAPI(t, n)
	}
}

func measureAPI(t *testing.T, n int) {
	const namespaces = 100
	var nss []string
	for i := range namespaces {
		nss = append(nss, fmt.Sprintf("ns-%d", i))
	}
	fake := apitest.New(t, nss...)
	slice := func(i, gen int) map[string]any {
		var eps []apitest.Endpoint
		for k := range 3 {
			eps = append(eps, apitest.Ready(fmt.Sprintf("10.%d.%d.%d", i/250, i%250, k+1+gen*3)))
		}
		return apitest.Slice(fmt.Sprintf("svc-%d-1", i), fmt.Sprintf("svc-%d", i), "IPv4", http8080, eps...)
	}
	for i := range n {
		fake.Apply(nss[i%namespaces], slice(i, 0))
	}
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	g0 := runtime.NumGoroutine()
	start := time.Now()
	ws := make([]*Watcher, n)
	for i := range n {
		svc, err := ParseService(fmt.Sprintf("svc-%d.%s:8080", i, nss[i%namespaces]), Defaults{})
		if err != nil {
			t.Fatal(err)
		}
		ws[i] = Start(Config{Service: svc, IPv4: true, IPv6: true,
			API: &APISource{Endpoint: fake.URL(), CAFile: fake.CAFile, TokenFile: fake.TokenFile}}, nil)
	}
	defer func() {
		for _, w := range ws {
			w.Stop()
		}
	}()
	waitAll := func(gen int) {
		for _, w := range ws {
			want := 3
			for {
				s := w.Snapshot()
				if s != nil && len(s.Endpoints) == want && s.Endpoints[0].IP.As4()[3] == byte(1+gen*3) {
					break
				}
				time.Sleep(time.Millisecond)
			}
		}
	}
	waitAll(0)
	listed := time.Since(start)
	for fake.Streams() < n {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(time.Second) // surplus connections of the first concurrent dials close
	accepted, open := fake.Conns()
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	g1 := runtime.NumGoroutine()
	start = time.Now()
	for i := range n {
		fake.Apply(nss[i%namespaces], slice(i, 1))
	}
	waitAll(1)
	churn := time.Since(start)
	var events uint64
	for _, w := range ws {
		events += w.Stats().Events
	}
	t.Logf("%d Services via api: all listed and watching in %v; %d connections open to the apiserver for %d watch streams (%d accepted: concurrent first dials, the surplus closed by HTTP/2); heap +%.1f MiB (%.1f KiB per Service, fake server's side included); goroutines +%d (%.1f per Service, fake's included); one change per Service (%d changes) seen everywhere in %v, %d events handled",
		n, listed.Round(time.Millisecond), open, fake.Streams(), accepted,
		float64(after.HeapInuse-before.HeapInuse)/(1<<20), float64(after.HeapInuse-before.HeapInuse)/1024/float64(n),
		g1-g0, float64(g1-g0)/float64(n), n, churn.Round(time.Millisecond), events)
}
