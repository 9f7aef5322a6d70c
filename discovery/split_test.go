package discovery

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// splitWatcher is a Watcher of name that has DNS-returned endpoints
// 10.<net>.0.1… (n of them) and, if healthy >= 0, health checks that pass
// for the first healthy of them. It never asks DNS.
func splitWatcher(t *testing.T, name string, net, n, healthy int) *Watcher {
	t.Helper()
	svc, err := ParseService(name+".bbs:80", Defaults{Namespace: "default", ClusterDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Service: svc, IPv4: true, Resolver: &Resolver{Servers: []string{"127.0.0.1:1"}}}
	if healthy >= 0 {
		cfg.Health = &HealthCheck{}
	}
	w := New(cfg, nil)
	t.Cleanup(w.Stop)
	eps := make([]Endpoint, n)
	for i := range eps {
		eps[i] = Endpoint{Dial: fmt.Sprintf("10.%d.%d.%d:80", net, i/250, i%250+1)}
	}
	w.snap.Store(&Snapshot{Service: svc, Endpoints: eps, Seq: 1,
		Unavailable: fmt.Errorf("service %s: %w", svc, errors.New("no ready endpoints"))})
	if healthy >= 0 {
		v := &healthView{Seq: 1, eligible: map[string]bool{}}
		for _, e := range eps[:healthy] {
			v.add(e, time.Time{})
		}
		v.Panic = healthy == 0 && n > 0
		w.prober.view.Store(v)
	}
	return w
}

// shares sweeps u over [0,1) in steps of 1/steps and returns how many u
// each member got (and -1's count last).
func shares(sp *Split, steps int) []int {
	out := make([]int, len(sp.Members)+1)
	for k := range steps {
		i, _ := sp.Pick((float64(k) + 0.5) / float64(steps))
		if i < 0 {
			i = len(sp.Members)
		}
		out[i]++
	}
	return out
}

// The draw u falls on the weighted Services with a usable endpoint in
// proportion to their weights, exactly (a sweep, not a sample); a Service
// with none (empty, or every endpoint failing its checks) gives its share
// to the others; a backup gets nothing while a weighted Service is usable,
// everything when none is; without weights each usable endpoint weighs 1.
func TestSplitPick(t *testing.T) {
	type svc struct {
		n, healthy, weight int // healthy -1: no health checks
	}
	for _, tc := range []struct {
		name        string
		byEndpoints bool
		svcs        []svc
		want        []int // per member, then "none", out of 1000
	}{
		{"90/10", false, []svc{{1, -1, 90}, {5, -1, 10}}, []int{900, 100, 0}},
		{"1/99", false, []svc{{1, -1, 1}, {20, -1, 99}}, []int{10, 990, 0}},
		{"pods empty", false, []svc{{1, -1, 90}, {0, -1, 10}}, []int{1000, 0, 0}},
		{"pods unhealthy", false, []svc{{1, -1, 90}, {5, 0, 10}}, []int{1000, 0, 0}},
		{"pods partly healthy", false, []svc{{1, -1, 50}, {5, 1, 50}}, []int{500, 500, 0}},
		{"backup idle", false, []svc{{1, -1, 1}, {3, -1, 0}}, []int{1000, 0, 0}},
		{"backup serves", false, []svc{{0, -1, 1}, {3, -1, 0}}, []int{0, 1000, 0}},
		{"first backup", false, []svc{{0, -1, 1}, {3, -1, 0}, {3, -1, 0}}, []int{0, 1000, 0, 0}},
		{"empty backup skipped", false, []svc{{2, 0, 1}, {0, -1, 0}, {3, -1, 0}}, []int{0, 0, 1000, 0}},
		{"no weights: per endpoint", true, []svc{{1, -1, 0}, {5, -1, 0}}, []int{167, 833, 0}},
		{"no weights, 1 vs 20", true, []svc{{1, -1, 0}, {20, -1, 0}}, []int{48, 952, 0}},
		{"no weights, unhealthy", true, []svc{{4, 1, 0}, {4, -1, 0}}, []int{200, 800, 0}},
		{"nothing usable", false, []svc{{0, -1, 1}, {2, 0, 1}}, []int{0, 0, 1000}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sp := &Split{ByEndpoints: tc.byEndpoints}
			for i, s := range tc.svcs {
				w := splitWatcher(t, fmt.Sprintf("s%d", i), i+1, s.n, s.healthy)
				sp.Members = append(sp.Members, SplitMember{Watcher: w, Weight: s.weight})
			}
			got := shares(sp, 1000)
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Fatalf("shares %v, want %v", got, tc.want)
			}
		})
	}
}

// Raising the last Service's weight keeps the draws that were on it on it:
// a client whose key hashes there does not move back and forth as the
// weight goes 1, 5, 25, 50, 75, 100.
func TestSplitPickNested(t *testing.T) {
	vm, pods := splitWatcher(t, "vm", 1, 1, -1), splitWatcher(t, "pods", 2, 5, -1)
	prev := map[int]bool{}
	for _, pct := range []int{1, 5, 25, 50, 75, 100} {
		sp := &Split{Members: []SplitMember{{Watcher: vm, Weight: 100 - pct}, {Watcher: pods, Weight: pct}}}
		for k := range 1000 {
			i, _ := sp.Pick((float64(k) + 0.5) / 1000)
			if prev[k] && i != 1 {
				t.Fatalf("at %d%% the draw %d left the pods", pct, k)
			}
			prev[k] = i == 1
		}
	}
}

// A request is handed candidates of its Service only (the sampler's count
// of them); a retry every usable endpoint of every weighted Service; with
// none usable, the first Service that fails open serves; with no endpoint
// anywhere the error names every Service.
func TestSplitCandidates(t *testing.T) {
	ctx := context.Background()
	vm, pods := splitWatcher(t, "vm", 1, 1, -1), splitWatcher(t, "pods", 2, 20, -1)
	backup := splitWatcher(t, "old", 3, 3, -1)
	sp := &Split{Members: []SplitMember{
		{Watcher: vm, Weight: 10, Sampler: &Sampler{Pick: PickRandom, Size: 2}},
		{Watcher: pods, Weight: 90, Sampler: &Sampler{Pick: PickRandom, Size: 2}},
		{Watcher: backup, Weight: 0},
	}}
	eps, err := sp.Candidates(ctx, 0.5, -1, false)
	if err != nil || len(eps) != 2 || !strings.HasPrefix(eps[0].Dial, "10.2.") || !strings.HasPrefix(eps[1].Dial, "10.2.") {
		t.Fatalf("u 0.5 (pods): %v, %v; want 2 pod endpoints", eps, err)
	}
	if eps, err = sp.Candidates(ctx, 0.05, -1, false); err != nil || len(eps) != 1 || eps[0].Dial != "10.1.0.1:80" {
		t.Fatalf("u 0.05 (vm): %v, %v", eps, err)
	}
	if eps, err = sp.Candidates(ctx, 0.05, 1, false); err != nil || !strings.HasPrefix(eps[0].Dial, "10.2.") {
		t.Fatalf("u 0.05, cookie of the pods: %v, %v; want pods", eps, err)
	}
	if eps, err = sp.Candidates(ctx, 0.5, -1, true); err != nil || len(eps) != 21 {
		t.Fatalf("retry: %d endpoints, %v; want the 21 of vm and pods", len(eps), err)
	}
	if tr := backup.Traffic(); tr.Requests != 0 || tr.BackupInUse {
		t.Fatalf("backup traffic %+v while primaries serve", tr)
	}

	// Both weighted Services empty: the backup.
	vm.snap.Store(&Snapshot{Service: vm.cfg.Service, Seq: 2, Unavailable: errors.New("vm: no ready endpoints")})
	pods.snap.Store(&Snapshot{Service: pods.cfg.Service, Seq: 2, Unavailable: errors.New("pods: no ready endpoints")})
	if eps, err = sp.Candidates(ctx, 0.5, -1, false); err != nil || len(eps) != 3 || !strings.HasPrefix(eps[0].Dial, "10.3.") {
		t.Fatalf("primaries empty: %v, %v; want the backup's 3", eps, err)
	}
	if tr := backup.Traffic(); tr.Requests != 1 || tr.Backup != 1 || !tr.BackupInUse || tr.ByEndpoint["10.3.0.1:80"] != 1 {
		t.Fatalf("backup traffic %+v, want 1 request as backup, in use", tr)
	}
	backup.snap.Store(&Snapshot{Service: backup.cfg.Service, Seq: 2, Unavailable: errors.New("old: no ready endpoints")})
	_, err = sp.Candidates(ctx, 0.5, -1, false)
	if err == nil || !strings.Contains(err.Error(), "vm.bbs.svc.cluster.local:80, pods.bbs.svc.cluster.local:80, old.bbs.svc.cluster.local:80") ||
		!strings.Contains(err.Error(), "pods: no ready endpoints") {
		t.Fatalf("nothing anywhere: %v; want an error naming every Service and why", err)
	}

	// Every endpoint failing its checks and no backup: fail open on the first.
	sick := splitWatcher(t, "sick", 4, 2, 0)
	sp2 := &Split{Members: []SplitMember{{Watcher: sick, Weight: 1}, {Watcher: pods, Weight: 1}}}
	if eps, err = sp2.Candidates(ctx, 0.9, -1, false); err != nil || len(eps) != 2 || !strings.HasPrefix(eps[0].Dial, "10.4.") {
		t.Fatalf("all unhealthy: %v, %v; want sick's endpoints (fail open)", eps, err)
	}
}
