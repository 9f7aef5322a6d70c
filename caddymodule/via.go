package caddymodule

import (
	"fmt"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-headless/caddy-headless/discovery"
)

// ViaAPI is the apiserver `via api` watches. The names mean what they mean
// in `storage k8s`. JSON: "api": {"endpoint": …, "ca_file": …, "token_file": …}.
type ViaAPI struct {
	// The apiserver, https://host:port. Default: in a pod,
	// https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT.
	Endpoint string `json:"endpoint,omitempty"`

	// PEM file of the CA that signed the apiserver's certificate.
	// Default: the service account's ca.crt if it exists, else the
	// system's roots.
	CAFile string `json:"ca_file,omitempty"`

	// File with the bearer token, re-read every minute and on 401 (bound
	// service-account tokens rotate). Default: the service account's token.
	TokenFile string `json:"token_file,omitempty"`
}

// unmarshalVia parses `via dns|api [{ endpoint …; ca_file …; token_file … }]`.
func (h *Headless) unmarshalVia(d *caddyfile.Dispenser) error {
	v, err := oneArg(d)
	if err != nil {
		return err
	}
	if v != "dns" && v != "api" {
		return d.Errf("headless: via %q: want dns or api", v)
	}
	h.Via = v
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if v != "api" {
			return d.Errf("headless: via dns takes no block: endpoint, ca_file and token_file are settings of via api")
		}
		if h.API == nil {
			h.API = new(ViaAPI)
		}
		opt := d.Val()
		var field *string
		switch opt {
		case "endpoint":
			field = &h.API.Endpoint
		case "ca_file":
			field = &h.API.CAFile
		case "token_file":
			field = &h.API.TokenFile
		default:
			return d.Errf("headless: via api: unknown setting %q (endpoint, ca_file, token_file)", opt)
		}
		if *field != "" {
			return d.Errf("headless: via api: %s is given twice", opt)
		}
		if *field, err = oneArg(d); err != nil {
			return err
		}
	}
	return nil
}

// viaConfig sets cfg.API for `via api`, with the pod's defaults from det,
// and refuses the options that belong to the other source. It reads no
// file and contacts nothing: a wrong endpoint, CA, token or Role is
// reported by the watcher on its first attempt.
func (h *Headless) viaConfig(cfg *discovery.Config, det discovery.Detected) error {
	switch h.Via {
	case "", "dns":
		if h.API != nil {
			return fmt.Errorf("api (endpoint, ca_file, token_file) is a setting of via api; this source is via dns")
		}
		return nil
	case "api":
	default:
		return fmt.Errorf("via %q: want dns or api", h.Via)
	}
	var dnsOnly []string
	for _, o := range []struct {
		name string
		set  bool
	}{
		{"resolvers", len(h.Resolvers) > 0},
		{"edns_buffer_size", h.EDNSBufferSize != 0},
		{"refresh", h.RefreshMin != 0 || h.RefreshMax != 0},
		{"dial_timeout", h.DialTimeout != 0},
	} {
		if o.set {
			dnsOnly = append(dnsOnly, o.name)
		}
	}
	if len(dnsOnly) > 0 {
		return fmt.Errorf("%s: DNS options, unused via api (the apiserver pushes changes): remove them, or use via dns", strings.Join(dnsOnly, ", "))
	}
	a := discovery.APISource{Endpoint: det.APIServer, CAFile: det.APICAFile, TokenFile: det.APITokenFile}
	if h.API != nil {
		if h.API.Endpoint != "" {
			a.Endpoint = h.API.Endpoint
		}
		if h.API.CAFile != "" {
			a.CAFile = h.API.CAFile
		}
		if h.API.TokenFile != "" {
			a.TokenFile = h.API.TokenFile
		}
	}
	if a.Endpoint == "" {
		return fmt.Errorf("via api: endpoint: not set, and KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not in the environment (not in a pod?): set endpoint in the via api block")
	}
	cfg.API = &a
	cfg.Resolver.Servers = nil // not asked
	return nil
}

// sourceOf names a watcher's source for the admin API.
func sourceOf(cfg discovery.Config) string {
	if cfg.API != nil {
		return "api"
	}
	return "dns"
}

// APIStatus is the EndpointSlice watch of a `via api` watcher, as GET
// /headless/ shows it. Add fields, never rename.
type APIStatus struct {
	// Endpoint is the apiserver watched.
	Endpoint string `json:"endpoint"`
	// ResourceVersion is the newest one the watch saw (list or event).
	ResourceVersion string `json:"resource_version,omitempty"`
	// LastEvent is when the last list or event changed the slices.
	LastEvent time.Time `json:"last_event,omitzero"`
	// Slices counts the Service's EndpointSlices.
	Slices int `json:"slices"`
	// Events, Relists and StreamRestarts count what the watch did since the
	// watcher started: events that changed a slice, lists (the first one,
	// and one after each 410 Gone), watch streams that ended.
	Events         uint64 `json:"events"`
	Relists        uint64 `json:"relists"`
	StreamRestarts uint64 `json:"stream_restarts"`
	// Endpoints are every address of the slices at the Service's port, with
	// their conditions; used is true for those requests go to.
	Endpoints []APIEndpointStatus `json:"endpoints"`
}

// APIEndpointStatus is one address of an EndpointSlice.
type APIEndpointStatus struct {
	Address     string `json:"address"`
	Ready       bool   `json:"ready"`
	Serving     bool   `json:"serving"`
	Terminating bool   `json:"terminating"`
	Zone        string `json:"zone,omitempty"`
	NodeName    string `json:"node_name,omitempty"`
	Hostname    string `json:"hostname,omitempty"`
	Slice       string `json:"slice"`
	Used        bool   `json:"used"`
	// Refused says why the address policy refused the address.
	Refused string `json:"refused,omitempty"`
}

// apiStatusOf is the APIStatus of st; nil for a via dns watcher.
func apiStatusOf(st discovery.Status) *APIStatus {
	if st.Config.API == nil {
		return nil
	}
	out := &APIStatus{Endpoint: st.Config.API.Endpoint, Events: st.Stats.Events, Relists: st.Stats.Relists,
		StreamRestarts: st.Stats.StreamRestarts, Endpoints: []APIEndpointStatus{}}
	if st.Snapshot == nil || st.Snapshot.API == nil {
		return out
	}
	a := st.Snapshot.API
	out.ResourceVersion, out.LastEvent, out.Slices = a.ResourceVersion, a.LastEvent, a.Slices
	for _, e := range a.Endpoints {
		out.Endpoints = append(out.Endpoints, APIEndpointStatus{Address: e.Dial, Ready: e.Ready, Serving: e.Serving,
			Terminating: e.Terminating, Zone: e.Zone, NodeName: e.NodeName, Hostname: e.Hostname, Slice: e.Slice,
			Used: e.Used, Refused: e.Refused})
	}
	return out
}

// The metrics of `via api` watchers, exported for the services that have one.
var (
	descAPIEvents = prometheus.NewDesc("caddy_headless_api_events_total",
		"EndpointSlice watch events that changed a slice of a headless Service (via api).",
		[]string{"service"}, nil)
	descAPIRelists = prometheus.NewDesc("caddy_headless_api_relists_total",
		"Lists of a headless Service's EndpointSlices (via api): the first one, and one after each 410 Gone.",
		[]string{"service"}, nil)
	descAPIRestarts = prometheus.NewDesc("caddy_headless_api_stream_restarts_total",
		"EndpointSlice watch streams of a headless Service that ended (the apiserver's timeout, a broken connection, a 410) and were opened again (via api).",
		[]string{"service"}, nil)
	apiDescs = []*prometheus.Desc{descAPIEvents, descAPIRelists, descAPIRestarts}
)

func collectAPI(ch chan<- prometheus.Metric, st discovery.Stats, label string) {
	ch <- prometheus.MustNewConstMetric(descAPIEvents, prometheus.CounterValue, float64(st.Events), label)
	ch <- prometheus.MustNewConstMetric(descAPIRelists, prometheus.CounterValue, float64(st.Relists), label)
	ch <- prometheus.MustNewConstMetric(descAPIRestarts, prometheus.CounterValue, float64(st.StreamRestarts), label)
}
