package proxytest

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-headless/caddy-headless/caddymodule"
	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

// A pod that exits the moment it leaves its Service is still named by DNS
// for a while (up to 30 s behind a cache): its address refuses connections.
// With nothing configured but what the test needs to run on loopback,
// headless_proxy retries the refused dial on another endpoint and sets the
// refusing one aside: no request fails, and the admin API says which one.
func TestDepartedEndpointCostsNoRequest(t *testing.T) {
	port := samePortBackends(t, 2) // 127.0.0.2 and .3 serve; .4 has no listener
	dnsSrv := dnstest.Start(t, `
app.bbs.svc.cluster.local. 30 IN A 127.0.0.2
app.bbs.svc.cluster.local. 30 IN A 127.0.0.3
app.bbs.svc.cluster.local. 30 IN A 127.0.0.4
`)
	p := startCaddy(t, fmt.Sprintf(`
	headless_proxy app.bbs:%d {
		resolvers %s
		allow_addresses loopback # the backends listen on 127.0.0.x
		versions ipv4
	}`, port, dnsSrv.Addr))

	failed := 0
	for range 300 {
		if code, body := p.get(); code != http.StatusOK || (body != "127.0.0.2" && body != "127.0.0.3") {
			failed++
		}
	}
	if failed > 0 {
		t.Errorf("%d of 300 requests failed while DNS named an endpoint that refuses connections (want 0: retried elsewhere, and set aside)", failed)
	}

	resp, err := p.caddy.Client.Get("http://" + p.caddy.Admin + "/headless/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var status []caddymodule.WatcherStatus
	if err := json.NewDecoder(resp.Body).Decode(&status); err != nil {
		t.Fatal(err)
	}
	if len(status) != 1 {
		t.Fatalf("GET /headless/: %d watchers, want 1", len(status))
	}
	for _, e := range status[0].Endpoints {
		if want := e.IP == "127.0.0.4"; e.SetAside != want {
			t.Errorf("GET /headless/: endpoint %s set_aside %v, want %v", e.Address, e.SetAside, want)
		}
	}

	m, err := p.caddy.Client.Get("http://" + p.caddy.Admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer m.Body.Close()
	body, _ := io.ReadAll(m.Body)
	want := fmt.Sprintf("caddy_headless_endpoints_set_aside{service=%q} 1\n", status[0].Service)
	if !strings.Contains(string(body), want) {
		t.Errorf("/metrics has no %q", strings.TrimSpace(want))
	}
}
