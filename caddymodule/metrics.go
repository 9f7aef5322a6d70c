package caddymodule

import (
	"errors"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-headless/caddy-headless/discovery"
)

// Prometheus metrics, served at Caddy's /metrics (admin endpoint or the
// `metrics` handler) from the registry of the config that uses the watchers.
//
// Watchers outlive configs (a reload keeps them running) but a registry belongs
// to one config. So the watchers count (discovery.Stats, kept across reloads),
// and each config's registry gets one serviceCollector that translates the
// Status of each watcher that config uses, at scrape time.

// maxServiceLabels bounds the number of distinct `service` label values one
// config exports; the watchers beyond it are reported together as
// service="_other".
const maxServiceLabels = 200

// otherService is the label value of the watchers beyond maxServiceLabels.
const otherService = "_other"

var (
	descLookups = prometheus.NewDesc("caddy_headless_lookups_total",
		"Lookups of a headless Service, by outcome (success, nxdomain, nodata, servfail, refused, timeout, network_error, bad_answer).",
		[]string{"service", "outcome"}, nil)
	descQueries = prometheus.NewDesc("caddy_headless_dns_queries_total",
		"DNS questions asked for a headless Service (one lookup asks A and AAAA, or SRV plus the targets without glue).",
		[]string{"service"}, nil)
	descTruncated = prometheus.NewDesc("caddy_headless_truncated_replies_total",
		"UDP replies that came back truncated, each asked again over TCP (TCP fallbacks).",
		[]string{"service"}, nil)
	descDropped = prometheus.NewDesc("caddy_headless_dropped_records_total",
		"Records ignored, by reason: bound (an answer exceeded a bound: records per answer, SRV targets looked up) or address (an endpoint address that is refused: loopback or link-local unless allowed, outside allow_cidrs, or never usable such as port 0, 0.0.0.0/8, ::, multicast, 240.0.0.0/4 and IPv4-mapped IPv6).",
		[]string{"service", "reason"}, nil)
	descDuration = prometheus.NewDesc("caddy_headless_lookup_duration_seconds",
		"How long one lookup of a headless Service took, failover and TCP fallback included.",
		[]string{"service"}, nil)
	descEndpoints = prometheus.NewDesc("caddy_headless_endpoints",
		"Endpoints that DNS returned (before health checks and set-aside endpoints are left out).",
		[]string{"service"}, nil)
	descSinceSuccess = prometheus.NewDesc("caddy_headless_seconds_since_success",
		"Seconds since DNS last answered definitively (records, NXDOMAIN or NODATA); absent until it has.",
		[]string{"service"}, nil)
	descStale = prometheus.NewDesc("caddy_headless_stale",
		"1 while lookups fail and the endpoints are kept from an earlier answer, else 0.",
		[]string{"service"}, nil)
	descCache = prometheus.NewDesc("caddy_headless_dns_cache_max_age_seconds",
		"How old a DNS answer may be when it reaches the proxy: the longest TTL seen, once the answers' TTL was seen counting down (a cache, such as NodeLocal DNSCache, between the proxy and the cluster's DNS); 0 while none was detected.",
		[]string{"service"}, nil)
	descAside = prometheus.NewDesc("caddy_headless_endpoints_set_aside",
		"Endpoints that DNS still names but that get no requests: a connection to them failed, and none has succeeded since.",
		[]string{"service"}, nil)
)

// Traffic metrics: the share of a split per Service (per endpoint only in
// GET /headless/, to keep the label values bounded).
var (
	descRequests = prometheus.NewDesc("caddy_headless_requests_total",
		"Requests handed endpoints of a headless Service (each request of a split goes to one Service; a retry of a split counts for every Service it is handed).",
		[]string{"service"}, nil)
	descBackupRequests = prometheus.NewDesc("caddy_headless_backup_requests_total",
		"Requests handed a Service while it stood in as a backup (weight 0) of a split.",
		[]string{"service"}, nil)
	descBackupInUse = prometheus.NewDesc("caddy_headless_backup_in_use",
		"1 while a backup Service (weight 0) serves a split's requests because no weighted Service has a usable endpoint, else 0.",
		[]string{"service"}, nil)
)

// Health check metrics, exported for the services that have health checks.
var (
	descChecks = prometheus.NewDesc("caddy_headless_health_checks_total",
		"Active health checks of a headless Service's endpoints, by result (pass, fail).",
		[]string{"service", "result"}, nil)
	descTransitions = prometheus.NewDesc("caddy_headless_health_transitions_total",
		"Endpoints that became healthy or unhealthy (to), first checks of new endpoints included.",
		[]string{"service", "to"}, nil)
	descHealthy = prometheus.NewDesc("caddy_headless_healthy_endpoints",
		"Discovered endpoints that requests may go to: those passing health checks (and, if optimistic, those not yet checked).",
		[]string{"service"}, nil)
	descPanic = prometheus.NewDesc("caddy_headless_health_panic",
		"1 while endpoints are discovered but none passes health checks (requests go to all of them, or fail with fail_fast), else 0.",
		[]string{"service"}, nil)
)

// healthDescs are exported only for the services with health checks.
var healthDescs = []*prometheus.Desc{descChecks, descTransitions, descHealthy, descPanic}

// allDescs are the metrics a serviceCollector exports.
var allDescs = append([]*prometheus.Desc{descLookups, descQueries, descTruncated, descDropped,
	descDuration, descEndpoints, descSinceSuccess, descStale, descCache, descAside,
	descRequests, descBackupRequests, descBackupInUse}, append(healthDescs, apiDescs...)...)

// serviceCollector exports the watchers one config uses. One is registered on
// each config's registry; every Headless of that config adds its watcher.
type serviceCollector struct {
	limit int // distinct service labels before the rest become otherService

	mu      sync.Mutex
	members []member // in the order they joined, so labels stay put
	keys    map[string]bool
}

type member struct {
	service string // label value: discovery.Service.String()
	watcher *discovery.Watcher
}

func newServiceCollector() *serviceCollector {
	return &serviceCollector{limit: maxServiceLabels, keys: map[string]bool{}}
}

// registerMetrics makes the config's registry export the watcher with key.
// The first Headless of a config registers the collector; the others (and a
// second Provision of the same config) find it through AlreadyRegisteredError.
func registerMetrics(ctx caddy.Context, key string, w *discovery.Watcher) error {
	reg := ctx.GetMetricsRegistry()
	if reg == nil {
		return nil
	}
	c := newServiceCollector()
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			return err
		}
		existing, ok := are.ExistingCollector.(*serviceCollector)
		if !ok {
			return errors.New("headless: metrics: another collector already exports caddy_headless_* on this config's registry")
		}
		c = existing
	}
	c.add(key, w)
	return nil
}

func (c *serviceCollector) add(key string, w *discovery.Watcher) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.keys[key] {
		return
	}
	c.keys[key] = true
	c.members = append(c.members, member{service: w.Config().Service.String(), watcher: w})
}

// Describe implements prometheus.Collector.
func (c *serviceCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range allDescs {
		ch <- d
	}
}

// serviceSeries accumulates the watchers that share one service label: several
// watchers ask for the same Service when handlers set different resolvers or
// refresh intervals, and the watchers beyond the label limit share one label.
// Counters add up; the gauges show the worst watcher (fewest endpoints, oldest
// answer, stale if any is).
type serviceSeries struct {
	stats discovery.Stats // summed

	requests, backup uint64 // summed
	backupInUse      bool

	endpoints    int
	sinceSuccess float64 // -1 until one of the watchers has had an answer
	stale        bool
	cacheMaxAge  float64 // the longest among the watchers
	aside        int     // summed
	watchers     int

	api     bool // one of the watchers is via api (via.go)
	health  bool // one of the watchers has health checks
	healthy int  // fewest among the watchers with health checks
	panic   bool
}

// Collect implements prometheus.Collector.
func (c *serviceCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	members := c.members
	limit := c.limit
	c.mu.Unlock()

	now := time.Now()
	series := map[string]*serviceSeries{}
	var order []string
	for _, m := range members {
		label := m.service
		if series[label] == nil && len(order) >= limit {
			label = otherService
		}
		s := series[label]
		if s == nil {
			s = &serviceSeries{
				stats:        discovery.NewStats(),
				sinceSuccess: -1,
			}
			series[label] = s
			order = append(order, label)
		}
		s.add(m.watcher.Status(), now)
		tr := m.watcher.Traffic()
		s.requests += tr.Requests
		s.backup += tr.Backup
		s.backupInUse = s.backupInUse || tr.BackupInUse
	}

	for _, label := range order {
		s := series[label]
		st := s.stats
		for _, o := range discovery.AllOutcomes() {
			ch <- prometheus.MustNewConstMetric(descLookups, prometheus.CounterValue, float64(st.Lookups[o]), label, string(o))
		}
		ch <- prometheus.MustNewConstMetric(descQueries, prometheus.CounterValue, float64(st.Queries), label)
		ch <- prometheus.MustNewConstMetric(descTruncated, prometheus.CounterValue, float64(st.Truncated), label)
		ch <- prometheus.MustNewConstMetric(descDropped, prometheus.CounterValue, float64(st.Dropped), label, "bound")
		ch <- prometheus.MustNewConstMetric(descDropped, prometheus.CounterValue, float64(st.Refused), label, "address")
		buckets := discovery.DurationBuckets()
		cum := make(map[float64]uint64, len(buckets))
		var acc uint64
		for i, ub := range buckets {
			acc += st.Durations[i]
			cum[ub.Seconds()] = acc
		}
		ch <- prometheus.MustNewConstHistogram(descDuration, st.LookupCount(), st.DurationSum.Seconds(), cum, label)
		ch <- prometheus.MustNewConstMetric(descEndpoints, prometheus.GaugeValue, float64(s.endpoints), label)
		if s.sinceSuccess >= 0 {
			ch <- prometheus.MustNewConstMetric(descSinceSuccess, prometheus.GaugeValue, s.sinceSuccess, label)
		}
		stale := 0.0
		if s.stale {
			stale = 1
		}
		ch <- prometheus.MustNewConstMetric(descStale, prometheus.GaugeValue, stale, label)
		ch <- prometheus.MustNewConstMetric(descCache, prometheus.GaugeValue, s.cacheMaxAge, label)
		ch <- prometheus.MustNewConstMetric(descAside, prometheus.GaugeValue, float64(s.aside), label)
		ch <- prometheus.MustNewConstMetric(descRequests, prometheus.CounterValue, float64(s.requests), label)
		ch <- prometheus.MustNewConstMetric(descBackupRequests, prometheus.CounterValue, float64(s.backup), label)
		inUse := 0.0
		if s.backupInUse {
			inUse = 1
		}
		ch <- prometheus.MustNewConstMetric(descBackupInUse, prometheus.GaugeValue, inUse, label)
		if s.api {
			collectAPI(ch, st, label)
		}
		if !s.health {
			continue
		}
		ch <- prometheus.MustNewConstMetric(descChecks, prometheus.CounterValue, float64(st.Passes), label, "pass")
		ch <- prometheus.MustNewConstMetric(descChecks, prometheus.CounterValue, float64(st.Fails), label, "fail")
		ch <- prometheus.MustNewConstMetric(descTransitions, prometheus.CounterValue, float64(st.ToHealthy), label, "healthy")
		ch <- prometheus.MustNewConstMetric(descTransitions, prometheus.CounterValue, float64(st.ToUnhealthy), label, "unhealthy")
		ch <- prometheus.MustNewConstMetric(descHealthy, prometheus.GaugeValue, float64(s.healthy), label)
		panic := 0.0
		if s.panic {
			panic = 1
		}
		ch <- prometheus.MustNewConstMetric(descPanic, prometheus.GaugeValue, panic, label)
	}
}

// add translates one watcher's Status into the series.
func (s *serviceSeries) add(st discovery.Status, now time.Time) {
	s.stats.Add(st.Stats)
	s.api = s.api || st.Config.API != nil

	if h := st.Health; h != nil {
		if !s.health || h.Eligible < s.healthy {
			s.healthy = h.Eligible
		}
		s.panic = s.panic || h.Panic
		s.health = true
	}

	n, since, stale := 0, -1.0, false
	if snap := st.Snapshot; snap != nil {
		n, stale = len(snap.Endpoints), snap.Stale()
		if snap.Cached {
			s.cacheMaxAge = max(s.cacheMaxAge, snap.MaxTTL.Seconds())
		}
		if !snap.Resolved.IsZero() {
			since = max(now.Sub(snap.Resolved).Seconds(), 0)
		}
	}
	if s.watchers == 0 || n < s.endpoints {
		s.endpoints = n
	}
	s.sinceSuccess = max(s.sinceSuccess, since)
	s.stale = s.stale || stale
	s.aside += len(st.SetAside)
	s.watchers++
}

// Interface guards
var _ prometheus.Collector = (*serviceCollector)(nil)
