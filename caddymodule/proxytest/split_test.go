package proxytest

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
)

// The migration of the README, in one process: a VM Service (one endpoint)
// and a pods Service (three) behind `headless_proxy … { weights 10 90 }`,
// real HTTP backends, an in-process DNS server. The pods' Service emptied
// (NXDOMAIN) under a request loop: no request fails, all go to the VM once
// the next refresh has seen it; the pods back: the split resumes.
func TestSplitFollowsDNS(t *testing.T) {
	f := newSplitFixture(t, "10 90")
	dnsSrv, vm, pods, loop, until, counts := f.dns, f.vm, f.pods, f.loop, f.until, f.counts

	until("the split", 200, func(m map[string]int) bool { return m["127.0.0.2"] > 0 && podsOf(m) > 100 })

	dnsSrv.MustSet(t, vm) // the pods' name: NXDOMAIN
	until("all to the VM", 200, func(m map[string]int) bool { return m["127.0.0.2"] == 200 })
	if got := loop(500); got["127.0.0.2"] != 500 {
		t.Fatalf("pods emptied: %v, want all 500 on the VM", got)
	}

	dnsSrv.MustSet(t, vm+pods)
	got := until("the split resumes", 1000, func(m map[string]int) bool { return podsOf(m) > 800 })
	t.Logf("pods back, 1000 requests: %v; whole test: %v", got, counts)
}

// The VM as the pods' backup (weights 0 1): it serves only while the pods'
// Service has no endpoint, and no request fails.
func TestSplitBackupFollowsDNS(t *testing.T) {
	f := newSplitFixture(t, "0 1")
	dnsSrv, vm, pods, loop, until := f.dns, f.vm, f.pods, f.loop, f.until
	until("pods only", 200, func(m map[string]int) bool { return m["127.0.0.2"] == 0 })
	if got := loop(300); got["127.0.0.2"] != 0 {
		t.Fatalf("the backup served %d of 300 requests while the pods were there", got["127.0.0.2"])
	}
	dnsSrv.MustSet(t, vm)
	until("the backup stands in", 200, func(m map[string]int) bool { return m["127.0.0.2"] == 200 })
	dnsSrv.MustSet(t, vm+pods)
	until("the backup steps back", 200, func(m map[string]int) bool { return m["127.0.0.2"] == 0 })
	if got := loop(300); got["127.0.0.2"] != 0 {
		t.Fatalf("the backup served %d of 300 requests after the pods came back", got["127.0.0.2"])
	}
}

type splitFixture struct {
	p        *proxy
	dns      *dnstest.Server
	vm, pods string // zone text
	counts   map[string]int
	loop     func(n int) map[string]int
	until    func(what string, n int, cond func(map[string]int) bool) map[string]int
}

func podsOf(m map[string]int) int { return m["127.0.0.3"] + m["127.0.0.4"] + m["127.0.0.5"] }

func newSplitFixture(t *testing.T, weights string) *splitFixture {
	port := samePortBackends(t, 4) // 127.0.0.2 the VM, .3–.5 the pods
	f := &splitFixture{
		vm:     "vm.bbs.svc.cluster.local. 5 IN A 127.0.0.2\n",
		pods:   "pods.bbs.svc.cluster.local. 5 IN A 127.0.0.3\npods.bbs.svc.cluster.local. 5 IN A 127.0.0.4\npods.bbs.svc.cluster.local. 5 IN A 127.0.0.5\n",
		counts: map[string]int{},
	}
	f.dns = dnstest.Start(t, f.vm+f.pods)
	f.p = startCaddy(t, fmt.Sprintf(`
	headless_proxy vm.bbs:%d pods.bbs:%d {
		resolvers %s
		refresh 100ms
		allow_addresses loopback # the backends listen on 127.0.0.x
		versions ipv4
		weights %s
	}`, port, port, f.dns.Addr, weights))
	// Every request of the test, counted by backend; none may fail.
	p, counts := f.p, f.counts
	f.loop = func(n int) map[string]int {
		got := map[string]int{}
		for range n {
			code, body := p.get()
			if code != http.StatusOK {
				t.Fatalf("a request failed with status %d (%s); so far %v", code, strings.TrimSpace(body), counts)
			}
			got[body]++
			counts[body]++
		}
		return got
	}
	// until loops until cond holds for a window of n requests.
	f.until = func(what string, n int, cond func(map[string]int) bool) map[string]int {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
			if got := f.loop(n); cond(got) {
				return got
			}
		}
		t.Fatalf("%s: not within 10s; counts %v", what, counts)
		return nil
	}

	return f
}
