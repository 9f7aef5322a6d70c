package discovery

// Regression tests for bugs found by the fuzz targets and the hostile-DNS
// tests; each names what used to go wrong.

import (
	"testing"

	"github.com/caddy-headless/caddy-headless/caddymodule/discovery/dnstest"
)

// SRV records whose only target does not resolve used to give outcome
// "success" with no endpoints: metrics counted a success, and the error handed
// to requests said "no ready endpoints (SUCCESS …)".
func TestRegressionSRVWithoutAddressesIsNoData(t *testing.T) {
	srv := dnstest.Start(t, `_http._tcp.lost.bbs.svc.cluster.local. 5 IN SRV 0 100 8080 gone.lost.bbs.svc.cluster.local.`)
	res, err := lookup(t, srv, "lost:http", true, true)
	if err != nil || len(res.Endpoints) != 0 || res.Outcome != OutcomeNoData {
		t.Fatalf("got %d endpoints, outcome %s, %v; want none, nodata", len(res.Endpoints), res.Outcome, err)
	}
}
