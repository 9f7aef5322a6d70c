package kubestore

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The storage's metrics are process-wide, like its held locks: a config
// reload provisions a new Storage, but the locks it holds, and the counts,
// carry on. Collectors returns them for the config's registry.
var (
	operations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "caddy_headless_storage_operations_total",
		Help: "certmagic storage operations on Kubernetes, by operation (store, load, delete, exists, list, stat, lock, trylock, unlock) and result (ok, not_found, denied, timeout, api_<code>, error).",
	}, []string{"operation", "result"})
	durations = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "caddy_headless_storage_operation_duration_seconds",
		Help:    "Duration of certmagic storage operations on Kubernetes (lock: including the wait for the holder).",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300},
	}, []string{"operation"})
	requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "caddy_headless_storage_apiserver_requests_total",
		Help: "Requests the storage sent to the Kubernetes apiserver, by verb, resource and HTTP status (0: no answer).",
	}, []string{"verb", "resource", "code"})
	locksHeld = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "caddy_headless_storage_locks_held",
		Help: "Locks (Leases) this process holds and renews.",
	})
	renewals = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "caddy_headless_storage_lock_renewals_total",
		Help: "Heartbeats of held locks, by result (ok, lost, or the error's class).",
	}, []string{"result"})
)

// Collectors are the storage's metrics.
func Collectors() []prometheus.Collector {
	return []prometheus.Collector{operations, durations, requests, locksHeld, renewals}
}

func observe(op string, start time.Time, err *error) {
	operations.WithLabelValues(op, result(*err)).Inc()
	durations.WithLabelValues(op).Observe(time.Since(start).Seconds())
}

func countRequest(verb, resource string, code int) {
	requests.WithLabelValues(verb, resource, strconv.Itoa(code)).Inc()
}
