package kubestore_test

import (
	"context"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-headless/caddy-headless/kubestore"
	"github.com/caddy-headless/caddy-headless/kubestore/kubetest"
)

// metric is the value of the series name{labels} on reg (a histogram's
// sample count), 0 if there is none.
func metric(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	series:
		for _, m := range f.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue series
				}
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue()
			case m.Gauge != nil:
				return m.Gauge.GetValue()
			case m.Histogram != nil:
				return float64(m.Histogram.GetSampleCount())
			}
		}
	}
	return 0
}

// TestMetricsCountOperationsAndLocks: every operation is counted by
// operation and result with its latency, and locks held is a gauge. The
// metrics are process-wide, so the test looks at differences.
func TestMetricsCountOperationsAndLocks(t *testing.T) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(kubestore.Collectors()...)
	api := kubetest.New(t, "caddy")
	s := mustNew(t, api.Config("caddy"), nil)
	ctx := context.Background()
	const ops, dur, held = "caddy_headless_storage_operations_total", "caddy_headless_storage_operation_duration_seconds", "caddy_headless_storage_locks_held"
	storeOK := map[string]string{"operation": "store", "result": "ok"}
	loadMissing := map[string]string{"operation": "load", "result": "not_found"}
	storeDur := map[string]string{"operation": "store"}
	b1, b2, b3, b4 := metric(t, reg, ops, storeOK), metric(t, reg, ops, loadMissing), metric(t, reg, dur, storeDur), metric(t, reg, held, nil)
	if err := s.Store(ctx, "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(ctx, "missing"); err == nil {
		t.Fatal("Load of a missing key succeeded")
	}
	if err := s.Lock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	if d := metric(t, reg, held, nil) - b4; d != 1 {
		t.Errorf("%s changed by %v while one lock is held, want 1", held, d)
	}
	if err := s.Unlock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	if d := metric(t, reg, ops, storeOK) - b1; d != 1 {
		t.Errorf("%s{store,ok} changed by %v after one Store, want 1", ops, d)
	}
	if d := metric(t, reg, ops, loadMissing) - b2; d != 1 {
		t.Errorf("%s{load,not_found} changed by %v after one Load of a missing key, want 1", ops, d)
	}
	if d := metric(t, reg, dur, storeDur) - b3; d != 1 {
		t.Errorf("%s{store} observed %v durations after one Store, want 1", dur, d)
	}
	if d := metric(t, reg, held, nil) - b4; d != 0 {
		t.Errorf("%s changed by %v after Unlock, want 0", held, d)
	}
}
