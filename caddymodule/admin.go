package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-headless/caddy-headless/discovery"
)

func init() {
	caddy.RegisterModule(adminHeadless{})
}

// adminHeadless serves /headless/ on Caddy's admin endpoint: what each watcher
// has resolved, from which server, how old it is and the last error, and lets
// an operator ask for a lookup now. Like every admin route it is only on the
// admin listener, behind its host and origin checks.
type adminHeadless struct{}

// CaddyModule returns the Caddy module information.
func (adminHeadless) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.headless",
		New: func() caddy.Module { return new(adminHeadless) },
	}
}

// Routes returns the /headless/ routes.
func (a adminHeadless) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: adminPrefix, Handler: caddy.AdminHandlerFunc(a.serve)}}
}

const (
	adminPrefix  = "/headless/"
	refreshPath  = "refresh"
	refreshLimit = 30 * time.Second // the longest a POST .../refresh waits for lookups
)

// WatcherStatus is one watcher as GET /headless/ shows it. The field names are
// part of the API (documented in the README): add, never rename.
type WatcherStatus struct {
	// Service is the canonical name, `<fqdn without dot>:<port or port name>`,
	// as used in logs and in the metrics' service label.
	Service string `json:"service"`
	// Ref is the reference as written in the config that started the watcher.
	Ref string `json:"ref"`
	// FQDN is the Service's absolute name; QName the name asked (`_name._tcp.`
	// prefixed for SRV); RecordTypes the types asked for it.
	FQDN        string   `json:"fqdn"`
	QName       string   `json:"qname"`
	RecordTypes []string `json:"record_types"`
	// IPVersions are the address families used: "ipv4", "ipv6".
	IPVersions []string `json:"ip_versions"`
	// Port is dialed on every address of an A/AAAA Service; PortName is the
	// named port of an SRV Service (its records carry the ports).
	Port     uint16 `json:"port,omitempty"`
	PortName string `json:"port_name,omitempty"`
	// Resolvers are the DNS servers asked, in failover order.
	Resolvers []string `json:"resolvers"`
	// Status sums the rest up: "pending" (no lookup finished yet), "ok",
	// "empty" (DNS says there are no ready endpoints), "stale" (lookups fail,
	// the endpoints of an earlier answer are kept) or "failing" (lookups fail
	// and there are no endpoints).
	Status string `json:"status"`
	// Endpoints are the addresses DNS returned, sorted. Requests are sent to
	// those that pass health checks (if any are configured) and are not set
	// aside.
	Endpoints []EndpointStatus `json:"endpoints"`
	// HealthChecks is present when the endpoints are probed (`health_*` options).
	HealthChecks *HealthStatus `json:"health_checks,omitempty"`
	// Outcome of the last lookup (see discovery.AllOutcomes); empty while pending.
	Outcome string `json:"outcome,omitempty"`
	// Server is the DNS server that gave the last definitive answer.
	Server string `json:"server,omitempty"`
	// TTLSeconds is the TTL of that answer.
	TTLSeconds float64 `json:"ttl_seconds"`
	// Cached is true once the answers' TTL was seen counting down between
	// lookups: a cache sits between the proxy and the cluster's DNS, and
	// CacheMaxAgeSeconds (the longest TTL seen) is how old an answer may be.
	Cached             bool    `json:"cached"`
	CacheMaxAgeSeconds float64 `json:"cache_max_age_seconds,omitempty"`
	// AnswerAgeSeconds is how old the data of the last answer is: the time
	// since it arrived plus, from a cache, how long the cache had held it.
	AnswerAgeSeconds float64 `json:"answer_age_seconds"`
	// ResolvedAt is when DNS last answered definitively (records, NXDOMAIN or NODATA).
	ResolvedAt time.Time `json:"resolved_at,omitzero"`
	// Error is the last lookup's error, empty after a success; ErrorAt its time.
	Error   string    `json:"error,omitempty"`
	ErrorAt time.Time `json:"error_at,omitzero"`
	// Stale is true while the endpoints are kept from an earlier answer
	// because lookups fail; StaleSince is when the failures started.
	Stale      bool      `json:"stale"`
	StaleSince time.Time `json:"stale_since,omitzero"`
	// StaleLimitSeconds is the configured `stale` bound, 0 for none; Expired
	// reports that it passed and the endpoints were dropped.
	StaleLimitSeconds float64 `json:"stale_limit_seconds"`
	Expired           bool    `json:"expired"`
	// NextRefresh is when the next lookup is due.
	NextRefresh time.Time `json:"next_refresh,omitzero"`
	// Lookups counts the lookups done since the watcher started.
	Lookups uint64 `json:"lookups"`
	// Users is how many upstream sources (handlers, across loaded configs)
	// share the watcher.
	Users int `json:"users"`
	// Source is where the endpoints come from: "dns" or "api" (`via`).
	Source string `json:"source"`
	// API is the EndpointSlice watch of a `via api` source (via.go).
	API *APIStatus `json:"api,omitempty"`
	// Traffic counts the requests handed this Service's endpoints.
	Traffic TrafficStatus `json:"traffic"`
}

// TrafficStatus counts the requests a watcher handed out since it started,
// across every source that uses it: a split's share per Service.
type TrafficStatus struct {
	// Requests counts the requests given candidates of this Service (a
	// retry of a split counts for every Service it is handed).
	Requests uint64 `json:"requests"`
	// BackupRequests counts those handed out while the Service stood in as
	// a backup (weight 0) of a split; BackupInUse is true while it does.
	BackupRequests uint64 `json:"backup_requests"`
	BackupInUse    bool   `json:"backup_in_use"`
}

// EndpointStatus is one address requests are sent to.
type EndpointStatus struct {
	// Address is what is dialed, `ip:port` (IPv6 in brackets).
	Address string `json:"address"`
	IP      string `json:"ip"`
	Port    uint16 `json:"port"`
	// Target is the SRV target the address belongs to (absolute name); absent
	// for A/AAAA Services.
	Target string `json:"target,omitempty"`
	// Health is what the health checks say: "healthy", "unhealthy" or
	// "unknown" (not probed yet); absent without health checks.
	Health string `json:"health,omitempty"`
	// SetAside is true while the endpoint gets no requests because a
	// connection to it failed and none has succeeded since.
	SetAside bool `json:"set_aside,omitempty"`
	// LastCheck is when the last probe finished; LastError its error, absent
	// if it passed.
	LastCheck time.Time `json:"last_check,omitzero"`
	LastError string    `json:"last_error,omitempty"`
	// Requests counts the requests that had this endpoint among their
	// candidates since DNS returned it (with candidates 1, or lb_policy
	// first, the requests sent to it unless it was down).
	Requests uint64 `json:"requests"`
}

// HealthStatus sums up the health checks of a watcher's endpoints.
type HealthStatus struct {
	// Healthy counts the endpoints requests may go to: those passing (and,
	// with optimistic, those not probed yet).
	Healthy int `json:"healthy"`
	// Panic is true while endpoints are discovered but none passes: requests
	// then go to all of them, or fail with fail_fast.
	Panic bool `json:"panic"`
}

func (a adminHeadless) serve(w http.ResponseWriter, r *http.Request) error {
	rest := strings.TrimPrefix(r.URL.Path, adminPrefix)
	if rest == refreshPath || strings.HasPrefix(rest, refreshPath+"/") {
		if r.Method != http.MethodPost {
			return methodNotAllowed(w, r, http.MethodPost)
		}
		name := strings.TrimPrefix(strings.TrimPrefix(rest, refreshPath), "/")
		return a.refresh(w, r, name)
	}
	if r.Method != http.MethodGet {
		return methodNotAllowed(w, r, http.MethodGet)
	}
	entries := selectWatchers(rest)
	if rest != "" && len(entries) == 0 {
		return notFound(rest)
	}
	return writeStatus(w, entries)
}

// refresh looks up every selected watcher now and answers with their new
// state: every answer comes from a lookup that started after the request
// (Watcher.RequestRefresh). Concurrent requests cost no more lookups than
// that: the watchers coalesce what is asked of them at once, and a request
// starts no goroutine of its own.
func (a adminHeadless) refresh(w http.ResponseWriter, r *http.Request, name string) error {
	// Only the watchers of a running config: those of a config still
	// loading (which may yet fail) must not start asking DNS.
	entries := slices.DeleteFunc(selectWatchers(name), func(e selected) bool { return !e.watcher.Running() })
	if name != "" && len(entries) == 0 {
		return notFound(name)
	}
	ctx, cancel := context.WithTimeout(r.Context(), refreshLimit)
	defer cancel()
	switch err := refreshAll(ctx, entries); {
	case r.Context().Err() != nil:
		return r.Context().Err()
	case errors.Is(err, context.DeadlineExceeded):
		return caddy.APIError{
			HTTPStatus: http.StatusGatewayTimeout,
			Err:        fmt.Errorf("refresh did not finish within %s: %w (GET %s shows the state so far)", refreshLimit, err, adminPrefix),
		}
	case err != nil:
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: fmt.Errorf("refresh: %w", err)}
	}
	return writeStatus(w, entries)
}

// refreshWorkers bounds the lookups one refresh has asked for and not yet
// seen finish.
const refreshWorkers = 16

// refreshAll refreshes the watchers and returns every error. It asks at
// most refreshWorkers of them at once: it asks the first refreshWorkers,
// then, each time it has waited for the oldest, the next one. The waits run
// in order on the caller's goroutine; one watcher that is slow delays
// asking the rest, never the answer of those asked.
func refreshAll(ctx context.Context, entries []selected) error {
	errs := make([]error, len(entries))
	waits := make([]func(context.Context) (*discovery.Snapshot, error), len(entries))
	asked := 0
	for i := range entries {
		for ; asked < len(entries) && asked < i+refreshWorkers && ctx.Err() == nil; asked++ {
			waits[asked] = entries[asked].watcher.RequestRefresh()
		}
		err := ctx.Err() // the time is up: the rest is not asked
		if waits[i] != nil {
			_, err = waits[i](ctx)
			waits[i] = nil
		}
		if err != nil {
			errs[i] = fmt.Errorf("%s: %w", entries[i].watcher.Config().Service, err)
		}
	}
	return errors.Join(slices.DeleteFunc(errs, func(e error) bool { return e == nil })...)
}

// selected is a watcher picked for a response, with its pool key.
type selected struct {
	key     string
	watcher *discovery.Watcher
}

// selectWatchers returns the watchers whose canonical service name
// (`fqdn:port`) or FQDN equals name (case-insensitive, final dot optional),
// or all of them when name is empty; sorted by service, then key.
func selectWatchers(name string) []selected {
	name = strings.ToLower(name)
	if host, port, ok := strings.Cut(name, ":"); ok {
		name = strings.TrimSuffix(host, ".") + ":" + port
	} else {
		name = strings.TrimSuffix(name, ".")
	}
	var out []selected
	watchers.Range(func(k, v any) bool {
		w, ok := v.(*discovery.Watcher)
		key, isString := k.(string)
		if !ok || !isString {
			return true
		}
		svc := w.Config().Service
		if name == "" || name == svc.String() || name == strings.TrimSuffix(svc.FQDN, ".") {
			out = append(out, selected{key: key, watcher: w})
		}
		return true
	})
	slices.SortFunc(out, func(a, b selected) int {
		if c := strings.Compare(a.watcher.Config().Service.String(), b.watcher.Config().Service.String()); c != 0 {
			return c
		}
		return strings.Compare(a.key, b.key)
	})
	return out
}

func writeStatus(w http.ResponseWriter, entries []selected) error {
	out := make([]WatcherStatus, 0, len(entries))
	for _, e := range entries {
		users, _ := watchers.References(e.key)
		out = append(out, statusOf(e.watcher, users))
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}

// statusOf translates a watcher's Status into the admin API's terms.
func statusOf(w *discovery.Watcher, users int) WatcherStatus {
	st := w.Status()
	cfg, svc := st.Config, st.Config.Service
	out := WatcherStatus{
		Service:           svc.String(),
		Ref:               svc.Ref,
		FQDN:              svc.FQDN,
		QName:             svc.QName(),
		Port:              svc.Port,
		PortName:          svc.PortName,
		Resolvers:         append([]string{}, cfg.Resolver.Servers...),
		Status:            string(st.State),
		Endpoints:         []EndpointStatus{},
		StaleLimitSeconds: cfg.Stale.Seconds(),
		Users:             users,
		Source:            sourceOf(cfg),
	}
	if cfg.IPv4 {
		out.IPVersions = append(out.IPVersions, "ipv4")
	}
	if cfg.IPv6 {
		out.IPVersions = append(out.IPVersions, "ipv6")
	}
	switch {
	case svc.SRV():
		out.RecordTypes = []string{"SRV"}
	default:
		if cfg.IPv4 {
			out.RecordTypes = append(out.RecordTypes, "A")
		}
		if cfg.IPv6 {
			out.RecordTypes = append(out.RecordTypes, "AAAA")
		}
	}
	tr := w.Traffic()
	out.Traffic = TrafficStatus{Requests: tr.Requests, BackupRequests: tr.Backup, BackupInUse: tr.BackupInUse}
	s := st.Snapshot
	if s == nil {
		return out
	}
	if h := st.Health; h != nil {
		out.HealthChecks = &HealthStatus{Healthy: h.Eligible, Panic: h.Panic}
	}
	endpoint := func(e discovery.Endpoint) EndpointStatus {
		es := EndpointStatus{Address: e.Dial, IP: e.IP.String(), Port: e.Port, Target: e.Target, Requests: tr.ByEndpoint[e.Dial]}
		_, es.SetAside = slices.BinarySearch(st.SetAside, e.Dial)
		return es
	}
	if st.Health == nil {
		for _, e := range s.Endpoints {
			out.Endpoints = append(out.Endpoints, endpoint(e))
		}
	} else {
		for _, h := range st.Health.Endpoints { // the Snapshot's endpoints, with their health
			es := endpoint(h.Endpoint)
			es.Health, es.LastCheck = h.State.String(), h.LastCheck
			if h.LastError != nil {
				es.LastError = h.LastError.Error()
			}
			out.Endpoints = append(out.Endpoints, es)
		}
	}
	out.Outcome = string(s.Outcome)
	out.Server = s.Server
	out.TTLSeconds = s.TTL.Seconds()
	if !s.Resolved.IsZero() {
		age := time.Since(s.Resolved)
		if s.Cached {
			out.Cached, out.CacheMaxAgeSeconds = true, s.MaxTTL.Seconds()
			age += s.MaxTTL - s.TTL
		}
		out.AnswerAgeSeconds = age.Seconds()
	}
	out.ResolvedAt = s.Resolved
	if s.Err != nil {
		out.Error = s.Err.Error()
	}
	out.ErrorAt = s.ErrAt
	out.Stale, out.StaleSince = s.Stale(), s.StaleSince
	out.Expired = s.Expired
	out.NextRefresh = s.Next
	out.Lookups = s.Seq
	out.API = apiStatusOf(st)
	return out
}

func methodNotAllowed(w http.ResponseWriter, r *http.Request, allow string) error {
	w.Header().Set("Allow", allow)
	return caddy.APIError{
		HTTPStatus: http.StatusMethodNotAllowed,
		Err:        fmt.Errorf("method %s not allowed on %s: use %s", r.Method, r.URL.Path, allow),
	}
}

func notFound(name string) error {
	return caddy.APIError{
		HTTPStatus: http.StatusNotFound,
		Err: fmt.Errorf("no headless watcher for %q: give a Service's FQDN or fqdn:port as GET %s lists them",
			name, adminPrefix),
	}
}

// Interface guards
var _ caddy.AdminRouter = adminHeadless{}
