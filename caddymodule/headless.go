// Package caddymodule plugs the discovery core into Caddy: the
// http.reverse_proxy.upstreams.headless upstream source and its Caddyfile syntax.
package caddymodule

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"

	"github.com/caddy-headless/caddy-headless/discovery"
)

func init() {
	caddy.RegisterModule(new(Headless))
}

// Headless is a dynamic upstream source that sends requests to the endpoints of
// a Kubernetes headless Service, found through the cluster's DNS. The endpoint
// set is refreshed in the background, so requests never wait on DNS (except the
// very first one for a Service, at most dial_timeout); upstreams are dialed by
// IP address. Under the lb_policy choices that need only a few of them, each
// request is handed a few (see candidates), so the proxy's work per request
// does not grow with the Service.
//
// Every handler and every config that asks the same question shares one
// background watcher, and a config reload keeps it running.
type Headless struct {
	// The Service to send requests to: `svc`, `svc.namespace`, or a fully
	// qualified name (`svc.ns.svc.cluster.local`, a per-pod name such as
	// `web-0.web.ns.svc.cluster.local`, or any name ending in `.`), then `:port`.
	// A port number means the A/AAAA records of the name plus that port; a port
	// name means the SRV records `_name._tcp.<fqdn>` of that named port, whose
	// ports are used. Required.
	Service string `json:"service,omitempty"`

	// Several Services behind this one source, instead of service: each
	// request goes to one of them, drawn by weight among those with a usable
	// endpoint, and is handed candidates of that Service only. Every other
	// option applies to each of them. At most 16. See the README's migration
	// walk-through.
	Services []WeightedService `json:"services,omitempty"`

	// DNS servers to ask, as `host` or `host:port` (port 53 by default). They
	// are tried in turn, starting with the one that answered last. Default: the
	// nameservers in /etc/resolv.conf.
	Resolvers []string `json:"resolvers,omitempty"`

	// The namespace that `svc` references are completed with. Default: the pod's
	// namespace (from the service-account namespace file, else the resolv.conf
	// search list), else `default`.
	Namespace string `json:"namespace,omitempty"`

	// The cluster's DNS domain. Default: from the `svc.<domain>` entry of the
	// resolv.conf search list, else `cluster.local`.
	ClusterDomain string `json:"cluster_domain,omitempty"`

	// The shortest interval between re-checks. The record TTL is clamped to
	// [refresh_min, refresh_max], then lengthened by up to 10% of jitter (so a
	// Service is asked at most once per interval on average).
	// Default: 1s — CoreDNS's kubernetes plugin answers from memory and shows a
	// pod change within tens of milliseconds, so its TTLs (5–30 s) need not be
	// waited for. A cache between Caddy and it (NodeLocal DNSCache, GKE's
	// kube-dns, a CoreDNS `cache`) answers from its own memory for up to its
	// TTL, whatever this is: the source detects it and warns (see the README,
	// Freshness in a real cluster).
	RefreshMin caddy.Duration `json:"refresh_min,omitempty"`

	// The longest interval between re-checks; set it above refresh_min to let
	// the long TTLs of non-cluster DNS lengthen the interval. Default: refresh_min.
	// After an error the next attempt comes sooner: 250ms, doubling, at most 5s.
	RefreshMax caddy.Duration `json:"refresh_max,omitempty"`

	// How long the last good endpoints are kept while DNS fails (timeouts,
	// SERVFAIL, REFUSED, network errors), counted from the first failure. After
	// that the set is dropped and requests fail. Default: 0, keep them until DNS
	// answers again. (NXDOMAIN and NODATA are answers, not failures: they mean
	// the Service has no ready endpoints, and empty the set at once.)
	Stale caddy.Duration `json:"stale,omitempty"`

	// The IP versions to use: `ipv4` means A records (or A glue of SRV
	// targets), `ipv6` means AAAA. Default: both.
	Versions *reverseproxy.IPVersions `json:"versions,omitempty"`

	// How long one DNS server may take to answer, and how long the very first
	// request for a Service waits for its first resolution. Default: 2s.
	DialTimeout caddy.Duration `json:"dial_timeout,omitempty"`

	// The EDNS0 UDP buffer size advertised to the DNS server; replies larger
	// than this come back truncated and are asked again over TCP. Default: 1232.
	EDNSBufferSize int `json:"edns_buffer_size,omitempty"`

	// Active health checks of the endpoints: when set, requests go only to the
	// endpoints that pass (or to all of them when none does, unless fail_fast).
	// Default: none, every endpoint DNS returns gets requests.
	HealthChecks *HealthChecks `json:"health_checks,omitempty"`

	// Ramp a newly healthy endpoint's share of requests up over this long
	// (from a tenth of its share to all of it), instead of jumping to 1/N: an
	// endpoint back from failure, or added after start, is not flooded while
	// its caches are cold. Needs health checks; not for the hashing and cookie
	// lb_policy choices (they must keep each client on its endpoint). Not at
	// start, nor while only one endpoint is healthy. Default: 0, off.
	SlowStart caddy.Duration `json:"slow_start,omitempty"`

	// Kinds of endpoint addresses to accept from DNS although they are
	// refused by default: `loopback` (127.0.0.0/8, ::1) and `link_local`
	// (169.254.0.0/16, where cloud metadata lives, and fe80::/10). Kubernetes
	// never gives a Service such endpoints, so an answer that has them comes
	// from outside the cluster or from a poisoned resolver, and would send
	// requests and probes to this host itself (Caddy's admin API) or to the
	// metadata service. Default: none.
	AllowAddresses []string `json:"allow_addresses,omitempty"`

	// If set, endpoints are taken only from these ranges (CIDR notation,
	// e.g. `10.0.0.0/8`). A loopback or link-local address is taken only from
	// a range inside loopback or link-local (`127.0.0.0/8`), not from one that
	// merely contains it (`0.0.0.0/0`). For a careful user of a resolver
	// outside the cluster.
	// Default: any address but those refused above.
	AllowCIDRs []string `json:"allow_cidrs,omitempty"`

	// How many endpoints each request is handed, so that the proxy's work per
	// request does not grow with the Service: under the lb_policy random,
	// random_choose, least_conn (distinct endpoints drawn at random),
	// round_robin (a window that rotates over all of them) and first (the
	// first ones). The hashing and cookie policies always get every
	// endpoint, as does a retry (weighted_round_robin is refused). -1 hands every endpoint to
	// every request (sampling off). Default: 2 (random_choose: its choose),
	// 8 when the handler marks endpoints down itself (passive health checks,
	// a circuit breaker): with a fraction f of them marked down, a request
	// finds none available with probability f^8 (1/256 at f = 0.5) unless
	// it is retried.
	Candidates int `json:"candidates,omitempty"`

	// Where the endpoints come from: `dns` (the cluster's DNS, no RBAC
	// needed) or `api` (the Service's EndpointSlices, watched on the
	// Kubernetes API: changes within milliseconds, drain of terminating
	// endpoints; needs list and watch on endpointslices). See via.go and
	// the README. Default: dns.
	Via string `json:"via,omitempty"`

	// The apiserver of `via api`; only with via api. Default: the pod's.
	API *ViaAPI `json:"api,omitempty"`

	// The first (or only) Service's watcher, its pool key and its sampler;
	// uses has every Service's.
	key     string
	watcher *discovery.Watcher
	sampler *discovery.Sampler
	uses    []serviceUse
	tries   string // the replacer variable that marks a request this source has handed upstreams; with sampler or split

	split *discovery.Split // with several Services
	draw  splitDraw        // how a request's Service is drawn, with split
}

// WeightedService is one Service of a headless source with several.
type WeightedService struct {
	// The Service, as for `service`. Required.
	Service string `json:"service"`
	// Its share of the requests relative to the others' weights, spread over
	// its own endpoints; 0 makes it a backup, used only while no Service with
	// a weight above 0 has a usable endpoint (backups in the order given).
	// Give a weight to every Service or to none: without weights every
	// usable endpoint of every Service gets the same share.
	Weight *int `json:"weight,omitempty"`
}

// serviceUse is one Service's shared watcher as this source uses it.
type serviceUse struct {
	key     string
	watcher *discovery.Watcher
	detach  func() // the watcher's logging (and events) through this config
	sampler *discovery.Sampler
}

// CaddyModule returns the Caddy module information. Its receiver is a
// pointer: Caddy's events app calls it on the event's origin (this source)
// from a watcher's goroutine, while a config that attaches to the same
// watcher may still be provisioning this value; a value receiver would copy,
// and so read, every field (a data race TestFailedLoadGivesLoggingBack met).
func (*Headless) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.upstreams.headless",
		New: func() caddy.Module { return new(Headless) },
	}
}

// environment is where pod defaults are read from; tests point it at fixtures.
var environment discovery.Environment

// watchers holds one *discovery.Watcher per distinct question, shared by every
// handler of every loaded config; the last Cleanup stops it.
var watchers = caddy.NewUsagePool()

// Provision parses the Service, fills in the defaults and attaches to the
// shared watcher, creating it if nobody asks this question yet. It never
// asks DNS: a new watcher starts looking up when the config starts (the
// headless app's Start), so `caddy validate` sends no query.
func (h *Headless) Provision(ctx caddy.Context) error {
	cfgs, err := h.configs(environment.Detect())
	if err != nil {
		return err
	}
	if err := checkPolicy(ctx.Modules()); err != nil {
		return fmt.Errorf("%s: %w", h, err)
	}
	for i := range cfgs {
		if err := h.HealthChecks.loadCA(cfgs[i].Service.Ref, &cfgs[i]); err != nil {
			return err
		}
	}
	app, err := appOf(ctx)
	if err != nil {
		return err
	}
	events := eventsOf(ctx)
	for _, cfg := range cfgs {
		key := cfg.Key()
		val, _, err := watchers.LoadOrNew(key, func() (caddy.Destructor, error) {
			return discovery.New(cfg, ctx.Logger()), nil
		})
		if err != nil {
			return err
		}
		w := val.(*discovery.Watcher)
		if app != nil {
			app.add(w)
		}
		// Until Cleanup: if this config fails to load, logging (and events)
		// go back to the config that runs.
		use := serviceUse{key: key, watcher: w, detach: w.AttachLogger(ctx.Logger())}
		if events != nil {
			detachLogger, detachEvents := use.detach, w.AttachEvents(emitter(ctx, events))
			use.detach = func() { detachEvents(); detachLogger() }
		}
		h.uses = append(h.uses, use)
		if err := registerMetrics(ctx, key, w); err != nil {
			return err
		}
	}
	h.key, h.watcher = h.uses[0].key, h.uses[0].watcher
	if err := checkSlowStartPolicy(ctx.Modules(), h.SlowStart); err != nil {
		return fmt.Errorf("%s: %w", h, err)
	}
	for i := range h.uses {
		h.uses[i].sampler = samplerFor(ctx.Modules(), h.Candidates)
	}
	h.sampler = h.uses[0].sampler
	if len(h.uses) > 1 {
		h.split, h.draw = h.newSplit(ctx.Modules())
	}
	if h.sampler != nil || h.split != nil {
		h.tries = fmt.Sprintf("http.reverse_proxy.upstreams.headless.%p.tried", h)
	}
	if msg := handlerHealthWarning(ctx.Modules(), h.HealthChecks != nil); msg != "" {
		ctx.Logger().Warn(msg, zap.String("service", h.names()))
	}
	return nil
}

// config turns the fields into a watcher configuration, completing what is
// left out from det, the pod's environment, and returns the core's verdict
// on it (discovery.Config.Validate, the owner of the rules on the values).
// What it checks itself is only what the translation needs: names it must
// parse (service, namespace, cluster_domain), words it must map
// (allow_addresses, health mode), and what has no place in the core's
// Config (candidates, slow_start without health checks). Provision calls it,
// and so do the Caddyfile parsers, which report its error at the option's
// file and line. It reads no file and asks no DNS.
func (h *Headless) config(det discovery.Detected) (discovery.Config, error) {
	if h.Service == "" && len(h.Services) > 0 {
		cfgs, err := h.configs(det) // the first Service's
		if err != nil {
			return discovery.Config{}, err
		}
		return cfgs[0], nil
	}
	def := det.Defaults
	fail := func(format string, args ...any) (discovery.Config, error) {
		return discovery.Config{}, fmt.Errorf("headless %s: "+format, append([]any{h.Service}, args...)...)
	}
	if h.Namespace != "" {
		if err := checkLabel("namespace", h.Namespace); err != nil {
			return discovery.Config{}, err
		}
		def.Namespace = h.Namespace
	}
	if h.ClusterDomain != "" {
		if _, err := discovery.ParseService("x:1", discovery.Defaults{ClusterDomain: h.ClusterDomain}); err != nil {
			return fail("cluster_domain %q is not a valid DNS name", h.ClusterDomain)
		}
		def.ClusterDomain = h.ClusterDomain
	}
	if h.Service == "" {
		return discovery.Config{}, fmt.Errorf("headless: service is required (e.g. backend.bbs:http)")
	}
	svc, err := discovery.ParseService(h.Service, def)
	if err != nil {
		return discovery.Config{}, fmt.Errorf("headless: %w", err)
	}
	servers := h.Resolvers
	if len(servers) == 0 {
		servers = det.Resolvers
	}
	if h.Candidates < -1 {
		return fail("candidates must be -1 (all), 0 (the default) or a count, got %d", h.Candidates)
	}
	res := &discovery.Resolver{Servers: servers, Timeout: time.Duration(h.DialTimeout), UDPSize: h.EDNSBufferSize}
	cfg := discovery.Config{
		Service:    svc,
		IPv4:       true,
		IPv6:       true,
		Resolver:   res,
		RefreshMin: time.Duration(h.RefreshMin),
		RefreshMax: time.Duration(h.RefreshMax),
		Stale:      time.Duration(h.Stale),
	}
	if cfg.Addresses, err = addressPolicy(h.AllowAddresses, h.AllowCIDRs); err != nil {
		return fail("%v", err)
	}
	if h.HealthChecks != nil {
		if cfg.Health, err = h.HealthChecks.check(h.Service); err != nil {
			return cfg, err
		}
		cfg.Health.SlowStart = time.Duration(h.SlowStart)
	}
	switch {
	case h.SlowStart < 0:
		return fail("slow_start must not be negative")
	case h.SlowStart > 0 && h.HealthChecks == nil:
		return fail("slow_start ramps endpoints up as they become healthy: it needs health checks (a health_* option)")
	}
	if v := h.Versions; v != nil && (v.IPv4 != nil || v.IPv6 != nil) {
		cfg.IPv4 = v.IPv4 != nil && *v.IPv4
		cfg.IPv6 = v.IPv6 != nil && *v.IPv6
	}
	if err := h.viaConfig(&cfg, det); err != nil {
		return fail("%v", err)
	}
	if err := cfg.Validate(); err != nil {
		return fail("%v", err)
	}
	return cfg.WithDefaults(), nil
}

// addressPolicy translates allow_addresses and allow_cidrs.
func addressPolicy(kinds, cidrs []string) (discovery.AddressPolicy, error) {
	var p discovery.AddressPolicy
	for _, k := range kinds {
		switch k {
		case "loopback":
			p.Loopback = true
		case "link_local":
			p.LinkLocal = true
		default:
			return p, fmt.Errorf("allow_addresses: unknown kind %q (use loopback or link_local; allow_cidrs takes ranges)", k)
		}
	}
	for _, c := range cidrs {
		pre, err := netip.ParsePrefix(c)
		if err != nil {
			return p, fmt.Errorf("allow_cidrs: %q is not a CIDR such as 10.0.0.0/8: %v", c, err)
		}
		p.CIDRs = append(p.CIDRs, pre.Masked())
	}
	return p, nil
}

// GetUpstreams returns the candidates the watcher picks for this request as
// fresh upstreams (Caddy writes into them), in two allocations whatever
// their number (the values and the pointers): a few of the endpoints, or all
// of them on a retry. It waits for DNS only if
// this Service was never resolved yet.
func (h *Headless) GetUpstreams(r *http.Request) ([]*reverseproxy.Upstream, error) {
	if h.split != nil {
		return h.splitUpstreams(r)
	}
	s := h.sampler
	if s != nil && h.retried(r) {
		s = nil
	}
	eps, err := h.watcher.Candidates(r.Context(), s)
	if err != nil {
		return nil, err
	}
	return upstreamsOf(eps), nil
}

// retried reports whether this source has handed r upstreams before:
// reverse_proxy asks once per try, so a second ask is a retry. The mark is a
// variable of the request's own replacer, so it ends with the request and
// does not depend on which other methods Caddy calls in between.
func (h *Headless) retried(r *http.Request) bool {
	repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if !ok {
		return false
	}
	if _, seen := repl.Get(h.tries); seen {
		return true
	}
	repl.Set(h.tries, true)
	return false
}

// upstreamsOf returns fresh upstreams for eps, in one block of values and one of pointers.
func upstreamsOf(eps []discovery.Endpoint) []*reverseproxy.Upstream {
	block := make([]reverseproxy.Upstream, len(eps))
	ups := make([]*reverseproxy.Upstream, len(eps))
	for i := range eps {
		block[i].Dial = eps[i].Dial
		ups[i] = &block[i]
	}
	return ups
}

// ResetCache is called by reverse_proxy before retrying a failed request. The
// retry's GetUpstreams hands out every endpoint (see retried) but the one
// that just failed, which is set aside (see
// discovery.Watcher.SetAside): a dial that failed means, most often, an
// endpoint that left (a pod stopped, a node lost) while DNS still names it.
// It asks the watcher for a refresh in the background (rate-limited) rather
// than looking anything up on the request path.
func (h *Headless) ResetCache(r *http.Request) error {
	// The endpoint the failed try went to (reverse_proxy set the placeholder
	// when it chose it) is set aside until it accepts connections again; a
	// Service that does not have it ignores it.
	dial := ""
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		dial, _ = repl.GetString("http.reverse_proxy.upstream.hostport")
	}
	for _, u := range h.uses {
		if dial != "" {
			u.watcher.SetAside(dial)
		}
		u.watcher.Refresh()
	}
	return nil
}

// samplerFor picks the candidates of each request by the lb_policy of the
// reverse_proxy handler above this source (in mods, the modules being
// provisioned from the root down): nil, every endpoint, for the policies
// that must see all of them and for candidates -1.
func samplerFor(mods []caddy.Module, candidates int) *discovery.Sampler {
	if candidates == -1 {
		return nil
	}
	if rp := parentProxy(mods); rp != nil {
		size := discovery.DefaultCandidates
		if p := rp.HealthChecks; rp.CBRaw != nil || p != nil && p.Passive != nil && (p.Passive.FailDuration > 0 || p.Passive.UnhealthyRequestCount > 0) {
			size = discovery.PassiveCandidates
		}
		if candidates > 0 {
			size = candidates
		}
		var pol reverseproxy.Selector = reverseproxy.RandomSelection{} // reverse_proxy's default, set after this
		if rp.LoadBalancing != nil && rp.LoadBalancing.SelectionPolicy != nil {
			pol = rp.LoadBalancing.SelectionPolicy
		}
		switch pol := pol.(type) {
		case reverseproxy.RandomSelection, *reverseproxy.RandomSelection, reverseproxy.LeastConnSelection, *reverseproxy.LeastConnSelection:
			return &discovery.Sampler{Pick: discovery.PickRandom, Size: size}
		case *reverseproxy.RandomChoiceSelection:
			return &discovery.Sampler{Pick: discovery.PickRandom, Size: max(size, pol.Choose)}
		case *reverseproxy.RoundRobinSelection:
			return &discovery.Sampler{Pick: discovery.PickWindow, Size: size}
		case reverseproxy.FirstSelection, *reverseproxy.FirstSelection:
			return &discovery.Sampler{Pick: discovery.PickFirst, Size: size}
		}
		return nil // hashing, cookie, weighted, or a policy we do not know: every endpoint
	}
	return nil // not under reverse_proxy (e.g. in a test): every endpoint
}

// Cleanup releases the shared watcher; the last user stops it.
func (h *Headless) Cleanup() error {
	var errs []error
	for _, u := range h.uses {
		u.detach()
		if _, err := watchers.Delete(u.key); err != nil {
			errs = append(errs, err)
		}
	}
	h.uses = nil
	return errors.Join(errs...)
}

// String names the source in Caddy's logs.
func (h *Headless) String() string { return "headless " + h.names() }

// names lists the Services, as written.
func (h *Headless) names() string {
	if len(h.Services) == 0 {
		return h.Service
	}
	names := make([]string, len(h.Services))
	for i, ws := range h.Services {
		names[i] = ws.Service
	}
	return strings.Join(names, ", ")
}

// handlerHealthWarning explains, if the reverse_proxy handler above this
// source (in mods, the modules being provisioned from the root down) has
// active health checks, that Caddy never runs them on dynamic upstreams.
func handlerHealthWarning(mods []caddy.Module, ours bool) string {
	if rp := parentProxy(mods); rp != nil {
		if rp.HealthChecks == nil || rp.HealthChecks.Active == nil {
			return ""
		}
		if ours {
			return "reverse_proxy's own active health checks (health_* beside dynamic) never run on dynamic upstreams; the headless source's (health_* inside its block) do"
		}
		return "reverse_proxy's active health checks (health_* beside dynamic) never run on dynamic upstreams: move the health_* options into the `dynamic headless` block"
	}
	return ""
}

// checkSlowStartPolicy refuses slow_start under a handler whose lb_policy
// picks by hash or cookie: leaving an endpoint out of some lists would move
// those clients to other endpoints and back.
func checkSlowStartPolicy(mods []caddy.Module, slowStart caddy.Duration) error {
	if slowStart <= 0 {
		return nil
	}
	if rp := parentProxy(mods); rp != nil {
		if rp.LoadBalancing == nil || rp.LoadBalancing.SelectionPolicy == nil {
			return nil // random
		}
		switch pol := rp.LoadBalancing.SelectionPolicy.(type) {
		case *reverseproxy.IPHashSelection, *reverseproxy.ClientIPHashSelection, *reverseproxy.URIHashSelection,
			*reverseproxy.HeaderHashSelection, *reverseproxy.CookieHashSelection, *reverseproxy.QueryHashSelection:
			return fmt.Errorf("slow_start cannot be used with lb_policy %s, which must keep each client on its endpoint: use random, round_robin, least_conn or first, or drop slow_start",
				pol.(caddy.Module).CaddyModule().ID.Name())
		}
		return nil
	}
	return nil
}

// parentProxy returns the reverse_proxy handler above this source: the
// nearest one in mods, the modules being provisioned from the root down;
// nil when there is none (a source provisioned on its own, in a test).
func parentProxy(mods []caddy.Module) *reverseproxy.Handler {
	for i := len(mods) - 1; i >= 0; i-- {
		if rp, ok := mods[i].(*reverseproxy.Handler); ok {
			return rp
		}
	}
	return nil
}

func checkLabel(field, v string) error {
	if len(v) > 63 || v == "" {
		return fmt.Errorf("headless: %s %q must be 1-63 characters", field, v)
	}
	for i, c := range v {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' && i > 0 && i < len(v)-1) {
			return fmt.Errorf("headless: %s %q: use lowercase letters, digits and inner '-'", field, v)
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner                  = (*Headless)(nil)
	_ caddy.CleanerUpper                 = (*Headless)(nil)
	_ reverseproxy.UpstreamSource        = (*Headless)(nil)
	_ reverseproxy.CachingUpstreamSource = (*Headless)(nil)
)
