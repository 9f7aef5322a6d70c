package caddymodule

import (
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-headless/caddy-headless/caddymodule/discovery"
)

// Prometheus metrics, served at Caddy's /metrics (admin endpoint or the
// `metrics` handler) from the registry of the config that uses the watchers.
//
// Watchers outlive configs (a reload keeps them running) but a registry belongs
// to one config. So lookups are counted per watcher, in lookupStats fed by the
// watcher's OnLookup hook and kept across reloads (counters never go back),
// and each config's registry gets one serviceCollector that reads the counters
// and the live snapshots of the watchers that config uses, at scrape time.

// maxServiceLabels bounds the number of distinct `service` label values one
// config exports; the watchers beyond it are reported together as
// service="_other".
const maxServiceLabels = 200

// otherService is the label value of the watchers beyond maxServiceLabels.
const otherService = "_other"

// durationBuckets are the upper bounds, in seconds, of the lookup duration
// histogram: in-cluster DNS answers in about a millisecond; a dead server costs
// dial_timeout (2s by default) per attempt.
var durationBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

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
		"Records ignored because an answer exceeded a bound (records per answer, SRV targets looked up).",
		[]string{"service"}, nil)
	descDuration = prometheus.NewDesc("caddy_headless_lookup_duration_seconds",
		"How long one lookup of a headless Service took, failover and TCP fallback included.",
		[]string{"service"}, nil)
	descEndpoints = prometheus.NewDesc("caddy_headless_endpoints",
		"Endpoints that requests are currently sent to.",
		[]string{"service"}, nil)
	descSinceSuccess = prometheus.NewDesc("caddy_headless_seconds_since_success",
		"Seconds since DNS last answered definitively (records, NXDOMAIN or NODATA); absent until it has.",
		[]string{"service"}, nil)
	descStale = prometheus.NewDesc("caddy_headless_stale",
		"1 while lookups fail and the endpoints are kept from an earlier answer, else 0.",
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
	descDuration, descEndpoints, descSinceSuccess, descStale}, healthDescs...)

// outcomeIndex maps each discovery.Outcome to its slot in lookupStats.outcomes.
var outcomeIndex = func() map[discovery.Outcome]int {
	m := make(map[discovery.Outcome]int, len(discovery.Outcomes))
	for i, o := range discovery.Outcomes {
		m[o] = i
	}
	return m
}()

// lookupStats counts the lookups of one watcher: its goroutine writes once
// per lookup, scrapes read. A mutex keeps the histogram's buckets, count and
// sum consistent with each other.
type lookupStats struct {
	mu                          sync.Mutex
	outcomes                    []uint64 // by outcomeIndex
	queries, truncated, dropped uint64
	buckets                     []uint64 // by durationBuckets, not cumulative; the last is +Inf
	count                       uint64
	sum                         float64 // seconds

	// Health checks, fed by the prober's OnCheck hook.
	passes, fails, toHealthy, toUnhealthy uint64
}

// observeCheck is the prober's OnCheck hook.
func (s *lookupStats) observeCheck(ev discovery.CheckEvent) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ev.Passed {
		s.passes++
	} else {
		s.fails++
	}
	switch {
	case ev.Changed && ev.State == discovery.Healthy:
		s.toHealthy++
	case ev.Changed && ev.State == discovery.Unhealthy:
		s.toUnhealthy++
	}
}

func newLookupStats() *lookupStats {
	return &lookupStats{
		outcomes: make([]uint64, len(discovery.Outcomes)),
		buckets:  make([]uint64, len(durationBuckets)+1),
	}
}

// statsByKey holds the lookupStats of every watcher key ever provisioned, so a
// watcher stopped and started again (same key) keeps counting where it left
// off. It grows with the number of distinct questions configured, not with
// reloads.
var statsByKey sync.Map // watcher key → *lookupStats

// lookupStatsFor returns the counters of the watcher with the given key.
func lookupStatsFor(key string) *lookupStats {
	if s, ok := statsByKey.Load(key); ok {
		return s.(*lookupStats)
	}
	s, _ := statsByKey.LoadOrStore(key, newLookupStats())
	return s.(*lookupStats)
}

// observe is the watcher's OnLookup hook.
func (s *lookupStats) observe(ev discovery.LookupEvent) {
	sec := ev.Duration.Seconds()
	b, _ := slices.BinarySearch(durationBuckets, sec) // first bound >= sec, or the +Inf slot
	s.mu.Lock()
	defer s.mu.Unlock()
	if i, ok := outcomeIndex[ev.Outcome]; ok {
		s.outcomes[i]++
	}
	s.queries += uint64(max(ev.Result.Queries, 0))
	s.truncated += uint64(max(ev.Result.Truncated, 0))
	s.dropped += uint64(max(ev.Result.Dropped, 0))
	s.buckets[b]++
	s.count++
	s.sum += sec
}

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
	stats   *lookupStats
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
	c.members = append(c.members, member{service: w.Config().Service.String(), watcher: w, stats: lookupStatsFor(key)})
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
	outcomes                    []uint64
	queries, truncated, dropped uint64
	buckets                     []uint64
	count                       uint64
	sum                         float64

	endpoints    int
	sinceSuccess float64 // -1 until one of the watchers has had an answer
	stale        bool
	watchers     int

	health                                bool // one of the watchers has health checks
	passes, fails, toHealthy, toUnhealthy uint64
	healthy                               int // fewest among the watchers with health checks
	panic                                 bool
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
				outcomes:     make([]uint64, len(discovery.Outcomes)),
				buckets:      make([]uint64, len(durationBuckets)+1),
				sinceSuccess: -1,
			}
			series[label] = s
			order = append(order, label)
		}
		s.add(m, now)
	}

	for _, label := range order {
		s := series[label]
		for i, o := range discovery.Outcomes {
			ch <- prometheus.MustNewConstMetric(descLookups, prometheus.CounterValue, float64(s.outcomes[i]), label, string(o))
		}
		ch <- prometheus.MustNewConstMetric(descQueries, prometheus.CounterValue, float64(s.queries), label)
		ch <- prometheus.MustNewConstMetric(descTruncated, prometheus.CounterValue, float64(s.truncated), label)
		ch <- prometheus.MustNewConstMetric(descDropped, prometheus.CounterValue, float64(s.dropped), label)
		cum := make(map[float64]uint64, len(durationBuckets))
		var acc uint64
		for i, ub := range durationBuckets {
			acc += s.buckets[i]
			cum[ub] = acc
		}
		ch <- prometheus.MustNewConstHistogram(descDuration, s.count, s.sum, cum, label)
		ch <- prometheus.MustNewConstMetric(descEndpoints, prometheus.GaugeValue, float64(s.endpoints), label)
		if s.sinceSuccess >= 0 {
			ch <- prometheus.MustNewConstMetric(descSinceSuccess, prometheus.GaugeValue, s.sinceSuccess, label)
		}
		stale := 0.0
		if s.stale {
			stale = 1
		}
		ch <- prometheus.MustNewConstMetric(descStale, prometheus.GaugeValue, stale, label)
		if !s.health {
			continue
		}
		ch <- prometheus.MustNewConstMetric(descChecks, prometheus.CounterValue, float64(s.passes), label, "pass")
		ch <- prometheus.MustNewConstMetric(descChecks, prometheus.CounterValue, float64(s.fails), label, "fail")
		ch <- prometheus.MustNewConstMetric(descTransitions, prometheus.CounterValue, float64(s.toHealthy), label, "healthy")
		ch <- prometheus.MustNewConstMetric(descTransitions, prometheus.CounterValue, float64(s.toUnhealthy), label, "unhealthy")
		ch <- prometheus.MustNewConstMetric(descHealthy, prometheus.GaugeValue, float64(s.healthy), label)
		panic := 0.0
		if s.panic {
			panic = 1
		}
		ch <- prometheus.MustNewConstMetric(descPanic, prometheus.GaugeValue, panic, label)
	}
}

func (s *serviceSeries) add(m member, now time.Time) {
	st := m.stats
	st.mu.Lock()
	for i, n := range st.outcomes {
		s.outcomes[i] += n
	}
	for i, n := range st.buckets {
		s.buckets[i] += n
	}
	s.queries += st.queries
	s.truncated += st.truncated
	s.dropped += st.dropped
	s.count += st.count
	s.sum += st.sum
	s.passes += st.passes
	s.fails += st.fails
	s.toHealthy += st.toHealthy
	s.toUnhealthy += st.toUnhealthy
	st.mu.Unlock()

	if p := m.watcher.Prober(); p != nil {
		v := p.View()
		if !s.health || len(v.Eligible) < s.healthy {
			s.healthy = len(v.Eligible)
		}
		s.panic = s.panic || v.Panic
		s.health = true
	}

	snap := m.watcher.Snapshot()
	n, since, stale := 0, -1.0, false
	if snap != nil {
		n, stale = len(snap.Endpoints), snap.Stale()
		if !snap.Resolved.IsZero() {
			since = max(now.Sub(snap.Resolved).Seconds(), 0)
		}
	}
	if s.watchers == 0 || n < s.endpoints {
		s.endpoints = n
	}
	s.sinceSuccess = max(s.sinceSuccess, since)
	s.stale = s.stale || stale
	s.watchers++
}

// Interface guards
var _ prometheus.Collector = (*serviceCollector)(nil)
