package main

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"time"
)

// Drill 9: abrupt churn. Endpoints leave the way pods and nodes leave
// (issue 20): stopped in the moment they are unpublished, with DNS still
// naming them for a while; and lost without a word (no RST) while DNS names
// them for 30 s. Every proxy runs with its own defaults: no retry or health
// setting is added to any of them.

const (
	abruptLag   = 5 // ticks (s) a stopped endpoint stays in DNS, as a cache would keep it
	silentTable = "chl_bench"
)

// Site bodies with nothing but what discovery needs.
var (
	ourDefaults = fmt.Sprintf("\theadless_proxy %s:%s {\n\t\tresolvers %s\n\t\t%s\n\t}\n", appName, epPort, dnsAddr, allowLoopback)
	aDefaults   = fmt.Sprintf("\treverse_proxy {\n\t\tdynamic a %s %s {\n\t\t\tresolvers %s\n\t\t\trefresh 1s\n\t\t}\n\t}\n", appName, epPort, dnsAddr)
)

// haproxyDefaults is HAProxy's DNS discovery with HAProxy's defaults: the
// timeouts are those of Debian's packaged haproxy.cfg (HAProxy has none of its
// own: it warns and waits forever), nothing else is set (retries 3 to the same
// server, no redispatch, no health checks; resolvers: a lookup every second,
// hold valid 10s, hold obsolete 0s).
func (h *harness) startHAProxyDefaults(ctx context.Context, name string, slots int) (*proxy, error) {
	listen, _ := h.ports()
	conf := fmt.Sprintf(`global
	nbthread 2
	maxconn 8000
defaults
	mode http
	timeout connect 5s
	timeout client 50s
	timeout server 50s
resolvers cluster
	nameserver dns %[1]s
frontend fe
	bind %[2]s
	default_backend app
backend app
	server-template ep %[3]d %[4]s:%[5]s resolvers cluster init-addr none resolve-prefer ipv4
`, dnsAddr, listen, slots, appName, epPort)
	return h.runHAProxy(ctx, name, listen, conf)
}

func drillAbrupt(ctx context.Context, h *harness) (*section, error) {
	caddyT := func(name, body string) target {
		return target{name, func(ctx context.Context) (*proxy, error) { return h.startCaddy(ctx, name, body, "/") }}
	}
	nginxT := func(initial []string) target {
		return target{"nginx (resolves names at start)", func(ctx context.Context) (*proxy, error) { return h.startNginx(ctx, "nginx", initial) }}
	}
	targets := func(initial []string) []target {
		return []target{
			caddyT("Caddy, `headless_proxy` (ours, defaults)", ourDefaults),
			caddyT("Caddy, `dynamic a` (refresh 1s, reverse_proxy defaults)", aDefaults),
			{"HAProxy, `server-template` + `resolvers` (defaults)", func(ctx context.Context) (*proxy, error) {
				return h.startHAProxyDefaults(ctx, "haproxy", 12)
			}},
			nginxT(initial),
		}
	}
	header := []string{"proxy", "requests", "failed", "failed, ratio to ours", "error kinds", "p50", "p99", "max"}

	// (a) Drain 0.
	const first, size = 20, 4
	churn := h.dur(20 * time.Second)
	var initial []string
	for i := range size {
		initial = append(initial, epAddr(first+i))
	}
	ta := &table{caption: "**(a) Drain 0**, DNS " + fmt.Sprint(abruptLag) + " s behind:", header: header}
	oursA := -1
	for _, tg := range targets(initial) {
		sm, err := abruptChurn(ctx, h, tg, initial, first, churn)
		if err != nil {
			return nil, err
		}
		if oursA < 0 {
			oursA = sm.errors
		}
		ta.add(tg.name, sm.n, sm.errors, ratio(float64(sm.errors), float64(oursA)), sm.kindList(), ms(sm.p50), ms(sm.p99), ms(sm.max))
		h.headline(fmt.Sprintf("Abrupt churn, drain 0 (an endpoint stopped as it is unpublished, every second for %d s; DNS names it %d s more): failed requests",
			int(churn.Seconds()), abruptLag), col(tg.name), fmt.Sprintf("%d of %d", sm.errors, sm.n))
	}

	// (b) A lost endpoint.
	inDNS, after := 30*time.Second, 10*time.Second
	late := 12 * time.Second
	if h.quick {
		inDNS, after, late = 4*time.Second, 2*time.Second, 3*time.Second
	}
	lostSet := []string{epAddr(100), epAddr(101), epAddr(102), epAddr(103)}
	tb := &table{caption: fmt.Sprintf("**(b) A lost endpoint**: silent (no RST), in DNS for %d s more:", int(inDNS.Seconds())),
		header: append(append([]string(nil), header[:4]...), "last failed request sent, after the loss", fmt.Sprintf("failed, of those sent ≥ %d s after the loss (their max)", int(late.Seconds())), "error kinds", "p50", "p99", "max")}
	var notes []string
	if err := silence(""); err != nil {
		notes = append(notes, "**(b) did not run:** nftables is needed to silence an endpoint on loopback: "+err.Error())
	} else {
		oursB := -1
		for _, tg := range targets(lostSet) {
			sm, lateSm, lastFail, err := abruptLost(ctx, h, tg, lostSet, inDNS, after, late)
			if err != nil {
				return nil, err
			}
			if oursB < 0 {
				oursB = sm.errors
			}
			last := "—"
			if sm.errors > 0 {
				last = secs(lastFail)
			}
			tb.add(tg.name, sm.n, sm.errors, ratio(float64(sm.errors), float64(oursB)), last,
				fmt.Sprintf("%d of %d (max %s)", lateSm.errors, lateSm.n, ms(lateSm.max)), sm.kindList(), ms(sm.p50), ms(sm.p99), ms(sm.max))
			h.headline(fmt.Sprintf("A lost endpoint (silent, in DNS %d s more): failed requests", int(inDNS.Seconds())), col(tg.name),
				fmt.Sprintf("%d of %d", sm.errors, sm.n))
		}
	}
	return &section{
		intro: fmt.Sprintf("Endpoints leave the way pods and nodes leave. Every proxy runs with **its own defaults**: no "+
			"retry, timeout or health setting is added to any of them (unlike drill 5). Ours: `headless_proxy app:%[1]s { resolvers …; %[2]s }` "+
			"and nothing else (so its defaults `lb_retries 2`, `dial_timeout 750ms` and the set-aside apply). Caddy: "+
			"`reverse_proxy { dynamic a app %[1]s { resolvers …; refresh 1s } }` (Caddy's defaults: no retry, no passive health, dial timeout 3 s; "+
			"`refresh 1s` instead of its default 1 m, so it sees changes as fast as the others). HAProxy: `server-template` + `resolvers` "+
			"(`timeout connect 5s`, `client`/`server 50s` as in Debian's haproxy.cfg, since HAProxy has none; otherwise its defaults: `retries 3` "+
			"to the same server, no `redispatch`, no health checks, a lookup every second). nginx: the story's configuration "+
			"(docs/design.md), resolving the names at start; its defaults `proxy_next_upstream error timeout` and `max_fails=1 fail_timeout=10s` apply "+
			"(`proxy_connect_timeout 300s` is the story's). An open-loop Go client sends %[3]d requests/s (timeout 30 s); "+
			"a request failed if it did not get a 200.\n\n"+
			"**(a) Drain 0.** %[4]d endpoints; every second for %[5]d s a new endpoint starts and is published, and the oldest is stopped in "+
			"the same moment (its server closed with whatever it was serving: connections reset, then connection refused), while DNS "+
			"keeps naming it for %[6]d s more, as a cache would (so DNS names the %[4]d live endpoints and up to %[6]d stopped ones). "+
			"Measured from the first replacement until %[6]d s after the last, when DNS names only live endpoints again.\n\n"+
			"**(b) A lost endpoint.** %[4]d endpoints; after 3 s of load one of them goes silent: an nftables rule (table `inet %[7]s`, "+
			"hook `output`, made for the drill and deleted after it) drops every packet to and from its address and port, as if its node "+
			"were lost — no RST, SYNs unanswered, pooled connections hang. DNS keeps naming it for %[8]d s, then drops it; measured from "+
			"the loss until %[9]d s after that.",
			epPort, allowLoopback, loadRate, size, int(churn.Seconds()), abruptLag, silentTable, int(inDNS.Seconds()), int(after.Seconds())),
		tables: []*table{ta, tb},
		notes: append(notes, "\"failed, ratio to ours\" is — where ours failed none. How each fails, by its defaults: "+
			"`dynamic a` has no retry, so every request that picks a stopped endpoint gets a 502 (at once when refused; after its "+
			"3 s dial timeout when silent) for as long as DNS names it. HAProxy retries 3 times on the *same* server "+
			"(no `redispatch`), waiting 1 s before each retry of a refused connection, then answers 503 (about 3 s for a refused "+
			"endpoint, 4 × `timeout connect 5s` for a silent one); requests on connections it had kept open to the lost "+
			"endpoint hang. nginx keeps the endpoints it resolved at start: in (a) once they have all been replaced every "+
			"request fails, whatever its retries; in (b) a connection to the lost endpoint waits for `proxy_connect_timeout` "+
			"(the kernel gives up its SYNs after about 2 minutes), longer than the client's 30 s, so nginx does not see a failure "+
			"within it, `max_fails` does not set the endpoint aside, and about one request in four hangs. Ours retries a "+
			"failed dial on another endpoint at once (a refused one) or after its 750 ms dial timeout (a silent one) and sets the "+
			"endpoint aside; what it cannot save is a request already sent to the lost endpoint or on a connection pooled to it: "+
			"it waits for an answer that never comes (no proxy here has a response timeout shorter than the client's 30 s by default)."),
	}, nil
}

// abruptChurn runs phase (a) against one proxy and summarizes the requests
// sent from the first replacement until DNS has caught up with the last.
func abruptChurn(ctx context.Context, h *harness, tg target, initial []string, first int, churn time.Duration) (summary, error) {
	live, err := h.startEndpoints(initial...)
	if err != nil {
		return summary{}, err
	}
	defer h.stopEndpoints()
	h.setRecords(appName, addrs(live)...)
	p, err := tg.start(ctx)
	if err != nil {
		return summary{}, err
	}
	defer p.stop()
	l := startLoad([]string{p.url}, loadRate)
	if err := sleep(ctx, 2*time.Second); err != nil {
		l.stop()
		return summary{}, err
	}
	tStart := l.elapsed()
	next := first + len(initial)
	type gone struct {
		addr string
		tick int
	}
	var stale []gone
	ticks := int(churn.Seconds())
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for k := 0; k < ticks+abruptLag; k++ {
		select {
		case <-ctx.Done():
			l.stop()
			return summary{}, ctx.Err()
		case <-tick.C:
		}
		if k < ticks {
			// A new endpoint is ready before it is published; the oldest
			// is stopped as it is unpublished (drain 0).
			e, err := h.startEndpoint(epAddr(next))
			if err != nil {
				l.stop()
				return summary{}, err
			}
			next++
			old := live[0]
			live = append(live[1:], e)
			old.stop(0)
			stale = append(stale, gone{old.addr, k})
		}
		// DNS still names what stopped less than abruptLag ticks ago.
		for len(stale) > 0 && k-stale[0].tick >= abruptLag {
			stale = stale[1:]
		}
		recs := addrs(live)
		for _, g := range stale {
			recs = append(recs, g.addr)
		}
		h.setRecords(appName, recs...)
	}
	tEnd := l.elapsed()
	if err := sleep(ctx, time.Second); err != nil {
		l.stop()
		return summary{}, err
	}
	ss := l.stop()
	debugSlow(tg.name+" (a)", ss, p)
	return summarize(window(ss, tStart, tEnd)), nil
}

// abruptLost runs phase (b) against one proxy: the last endpoint goes silent
// and stays in DNS for inDNS. It summarizes the requests sent from the loss
// until after has passed since DNS dropped it, and those of them that started
// late or later after the loss.
func abruptLost(ctx context.Context, h *harness, tg target, set []string, inDNS, after, late time.Duration) (all, lateSm summary, lastFail time.Duration, err error) {
	live, err := h.startEndpoints(set...)
	if err != nil {
		return all, lateSm, 0, err
	}
	defer h.stopEndpoints()
	h.setRecords(appName, addrs(live)...)
	p, err := tg.start(ctx)
	if err != nil {
		return all, lateSm, 0, err
	}
	defer p.stop()
	l := startLoad([]string{p.url}, loadRate)
	if err := sleep(ctx, 3*time.Second); err != nil {
		l.stop()
		return all, lateSm, 0, err
	}
	lost := set[len(set)-1]
	t0 := l.elapsed()
	if err := silence(lost); err != nil {
		l.stop()
		return all, lateSm, 0, err
	}
	defer silence("")
	err = sleep(ctx, inDNS)
	h.setRecords(appName, set[:len(set)-1]...)
	if err == nil {
		err = sleep(ctx, after)
	}
	t1 := l.elapsed()
	ss := l.stop() // waits for the requests still hanging (client timeout 30 s)
	if err != nil {
		return all, lateSm, 0, err
	}
	debugSlow(tg.name+" (b)", ss, p)
	w := window(ss, t0, t1)
	for _, s := range w {
		if !s.ok() {
			lastFail = max(lastFail, s.at-t0)
		}
	}
	return summarize(w), summarize(window(ss, t0+late, t1)), lastFail, nil
}

// silence makes addr (ip:port) silent: nftables drops every TCP packet to and
// from it, in the output hook (loopback traffic passes it both ways). An
// empty addr removes the rule (the whole table chl_bench, which only the
// bench makes). Returns nft's error (not root, no nftables).
func silence(addr string) error {
	_ = exec.Command("nft", "delete", "table", "inet", silentTable).Run() // absent is fine
	if addr == "" {
		// Is nft usable at all? Make and delete an empty table.
		if out, err := exec.Command("nft", "add", "table", "inet", silentTable).CombinedOutput(); err != nil {
			return fmt.Errorf("nft add table: %v: %s", err, strings.TrimSpace(string(out)))
		}
		return exec.Command("nft", "delete", "table", "inet", silentTable).Run()
	}
	ip, port, _ := strings.Cut(addr, ":")
	if !strings.HasPrefix(ip, "127.0.6.") {
		return fmt.Errorf("silence %s: only the bench's 127.0.6.x endpoints", addr)
	}
	script := fmt.Sprintf(`table inet %[1]s {
	chain out {
		type filter hook output priority 0; policy accept;
		ip daddr %[2]s tcp dport %[3]s drop
		ip saddr %[2]s tcp sport %[3]s drop
	}
}
`, silentTable, ip, port)
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft -f: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}
