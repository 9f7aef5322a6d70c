package caddymodule

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"

	"github.com/caddy-headless/caddy-headless/discovery"
	"github.com/caddy-headless/caddy-headless/kubeapi/apitest"
)

// A via api source: provisioning contacts nothing; the first request waits
// for the first list; GET /headless/ shows the source, the resourceVersion,
// the last event and each endpoint's conditions, zone and node; the
// metrics count events, relists and stream restarts.
func TestViaAPIProvisionRequestsStatus(t *testing.T) {
	fake := apitest.New(t, "bbs")
	port := []apitest.Port{{Name: "http", Port: 8080}}
	draining := apitest.Endpoint{Addresses: []string{"10.0.0.2"}, Serving: true, Terminating: true, Zone: "zone-b", NodeName: "node-2"}
	ready := apitest.Ready("10.0.0.1")
	ready.Zone, ready.NodeName = "zone-a", "node-1"
	fake.Apply("bbs", apitest.Slice("web-1", "web", "IPv4", port, ready, draining))

	h := &Headless{Service: "web.bbs:http", Via: "api", API: &ViaAPI{Endpoint: fake.URL(), CAFile: fake.CAFile, TokenFile: fake.TokenFile}}
	ctx := newTestContext(t)
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Cleanup() })
	if r := fake.Requests(); len(r) != 0 {
		t.Fatalf("Provision sent %q: it must contact nothing", r)
	}
	ups, err := getUpstreams(t, h)
	if err != nil || dialsOf(ups) != "10.0.0.1:8080" {
		t.Fatalf("upstreams %q, %v: want the ready endpoint only", dialsOf(ups), err)
	}

	fake.Apply("bbs", apitest.Slice("web-1", "web", "IPv4", port, draining))
	fake.Apply("bbs", apitest.Slice("web-2", "web", "IPv4", port))
	for {
		if s := h.watcher.Snapshot(); s != nil && len(s.Endpoints) == 1 && s.Endpoints[0].Dial == "10.0.0.2:8080" && s.API.Slices == 2 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	st := statusOf(h.watcher, 1)
	if st.Source != "api" || st.API == nil || st.API.ResourceVersion == "" || st.API.LastEvent.IsZero() || st.API.Relists != 1 || st.API.Events == 0 {
		b, _ := json.Marshal(st)
		t.Fatalf("status %s: want source api, a resourceVersion, a last event, 1 relist, events", b)
	}
	if len(st.API.Endpoints) != 1 || !st.API.Endpoints[0].Terminating || !st.API.Endpoints[0].Serving || st.API.Endpoints[0].Ready ||
		st.API.Endpoints[0].Zone != "zone-b" || st.API.Endpoints[0].NodeName != "node-2" || !st.API.Endpoints[0].Used {
		t.Fatalf("api endpoints %+v", st.API.Endpoints)
	}

	s := gather(t, ctx)
	s.expect(t, `caddy_headless_api_relists_total{service="web.bbs.svc.cluster.local:http"}`, 1)
	s.expect(t, `caddy_headless_api_events_total{service="web.bbs.svc.cluster.local:http"}`, 2)
	s.expect(t, `caddy_headless_api_stream_restarts_total{service="web.bbs.svc.cluster.local:http"}`, 0)
	families, err := ctx.GetMetricsRegistry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	families = slices.DeleteFunc(families, func(f *dto.MetricFamily) bool { return !strings.HasPrefix(f.GetName(), "caddy_headless_api_") })
	if len(families) != len(apiDescs) {
		t.Fatalf("%d caddy_headless_api_ families, want %d", len(families), len(apiDescs))
	}
	problems, _ := promlint.NewWithMetricFamilies(families).Lint()
	for _, p := range problems {
		t.Errorf("%s: %s", p.Metric, p.Text)
	}
}

// Watchers are shared exactly as DNS ones are: the same question via api
// shares one, via dns it is another one.
func TestViaAPIKeyPartsWatchers(t *testing.T) {
	det := discovery.Detected{Defaults: discovery.Defaults{Namespace: "bbs", ClusterDomain: "cluster.local"},
		Resolvers: []string{"127.0.0.1:53"}, APIServer: "https://127.0.0.1:6443"}
	viaAPI, err := (&Headless{Service: "web.bbs:80", Via: "api"}).config(det)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := (&Headless{Service: "web:80", Via: "api"}).config(det)
	viaDNS, _ := (&Headless{Service: "web.bbs:80"}).config(det)
	if viaAPI.Key() != again.Key() || viaAPI.Key() == viaDNS.Key() {
		t.Fatalf("keys:\n%s\n%s\n%s", viaAPI.Key(), again.Key(), viaDNS.Key())
	}
	if viaAPI.API == nil || viaAPI.API.Endpoint != "https://127.0.0.1:6443" {
		t.Fatalf("the pod's apiserver is not the default: %+v", viaAPI.API)
	}
	if _, err := (&Headless{Service: "web.bbs:80", Via: "api"}).config(discovery.Detected{}); err == nil || !strings.Contains(err.Error(), "KUBERNETES_SERVICE_HOST") {
		t.Fatalf("outside a pod without endpoint: %v", err)
	}
	for _, h := range []*Headless{
		{Service: "web.bbs:80", Via: "api", EDNSBufferSize: 4096},
		{Service: "web.bbs:80", Via: "api", DialTimeout: 1},
		{Service: "web.bbs:80", Via: "api", RefreshMin: 1},
		{Service: "web.bbs:80", API: &ViaAPI{Endpoint: "https://127.0.0.1:6443"}},
		{Service: "web.bbs:80", Via: "grpc"},
	} {
		if _, err := h.config(det); err == nil {
			t.Errorf("%+v: accepted", h)
		}
	}
}

var _ = context.Background
