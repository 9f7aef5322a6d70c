package discovery

// Hostile and broken DNS: answers the module must survive with a definite,
// asserted outcome. dnstest serves the well-formed misbehaviour (hooks, rcodes,
// silence); rawServer below sends what no DNS library would: wrong IDs, TC over
// TCP, half messages.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/caddy-headless/caddy-headless/discovery/dnstest"
	"github.com/caddy-headless/caddy-headless/internal/poll"
)

// rawServer answers DNS on UDP and TCP of one loopback port with whatever
// bytes its handlers produce.
type rawServer struct {
	Addr string
	pc   net.PacketConn
	l    net.Listener
	// udp returns the datagrams to send back to one query (none: stay silent).
	udp func(q *dns.Msg) [][]byte
	// tcp writes the reply to one query on c (it may write nothing, half a
	// message, or close at once); c is closed afterwards.
	tcp func(q *dns.Msg, c net.Conn)

	udpQs, tcpQs atomic.Int64
	wg           sync.WaitGroup
	mu           sync.Mutex
	conns        map[net.Conn]bool
}

func startRaw(t *testing.T, udp func(q *dns.Msg) [][]byte, tcp func(q *dns.Msg, c net.Conn)) *rawServer {
	t.Helper()
	s := &rawServer{udp: udp, tcp: tcp, conns: map[net.Conn]bool{}}
	var err error
	for range 20 {
		if s.pc, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		if s.l, err = net.Listen("tcp", s.pc.LocalAddr().String()); err == nil {
			break
		}
		s.pc.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
	s.Addr = s.pc.LocalAddr().String()
	s.wg.Add(2)
	go s.serveUDP()
	go s.serveTCP()
	t.Cleanup(func() {
		s.pc.Close()
		s.l.Close()
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

func (s *rawServer) serveUDP() {
	defer s.wg.Done()
	buf := make([]byte, 65535)
	for {
		n, from, err := s.pc.ReadFrom(buf)
		if err != nil {
			return
		}
		s.udpQs.Add(1)
		q := new(dns.Msg)
		if q.Unpack(buf[:n]) != nil || s.udp == nil {
			continue
		}
		for _, b := range s.udp(q) {
			s.pc.WriteTo(b, from)
		}
	}
}

func (s *rawServer) serveTCP() {
	defer s.wg.Done()
	for {
		c, err := s.l.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.conns[c] = true
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() {
				c.Close()
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
			}()
			var n uint16
			if binary.Read(c, binary.BigEndian, &n) != nil {
				return
			}
			b := make([]byte, n)
			if _, err := io.ReadFull(c, b); err != nil {
				return
			}
			s.tcpQs.Add(1)
			q := new(dns.Msg)
			if q.Unpack(b) != nil || s.tcp == nil {
				return
			}
			s.tcp(q, c)
		}()
	}
}

// hostileReply is a NOERROR reply to q holding the zone-file records given.
func hostileReply(t *testing.T, q *dns.Msg, records ...string) *dns.Msg {
	m := new(dns.Msg)
	m.SetReply(q)
	m.Authoritative = true
	for _, r := range records {
		rr, err := dns.NewRR(r)
		if err != nil {
			t.Error(err)
			continue
		}
		m.Answer = append(m.Answer, rr)
	}
	return m
}

// hostileWrite sends m as a server would: cut to the client's UDP buffer (TC
// set) or to 64 KiB over TCP.
func hostileWrite(w dns.ResponseWriter, q, m *dns.Msg) {
	size := dns.MaxMsgSize
	if w.LocalAddr().Network() == "udp" {
		size = dns.MinMsgSize
		if o := q.IsEdns0(); o != nil {
			size = int(o.UDPSize())
		}
	}
	m.Truncate(size)
	w.WriteMsg(m)
}

func mustPack(t *testing.T, m *dns.Msg) []byte {
	b, err := m.Pack()
	if err != nil {
		t.Error(err)
	}
	return b
}

// writeTCP writes b with its two-byte length prefix.
func writeTCP(c net.Conn, b []byte) {
	c.Write(binary.BigEndian.AppendUint16(nil, uint16(len(b))))
	c.Write(b)
}

// truncatedUDP makes every UDP reply an empty one with TC set, so the client
// asks again over TCP.
func truncatedUDP(q *dns.Msg) [][]byte {
	m := new(dns.Msg)
	m.SetReply(q)
	m.Truncated = true
	b, _ := m.Pack()
	return [][]byte{b}
}

func hostileService(t *testing.T, ref string) Service {
	t.Helper()
	svc, err := ParseService(ref, Defaults{Namespace: "bbs"})
	if err != nil {
		t.Fatal(err)
	}
	return svc
}

// hostileLookup runs one Lookup with a deadline that only guards against a
// hang; nothing here asserts speed.
func hostileLookup(t *testing.T, r *Resolver, ref string, v4, v6 bool) (Result, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := r.Lookup(ctx, hostileService(t, ref), v4, v6)
	if ctx.Err() != nil {
		t.Fatalf("Lookup of %s hung", ref)
	}
	return res, err
}

// hostileExchange asks the A (or other qtype) question of ref once.
func hostileExchange(t *testing.T, r *Resolver, ref string, qtype uint16) Reply {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	reply, err := r.Exchange(ctx, hostileService(t, ref).QName(), qtype)
	if err != nil {
		t.Fatalf("Exchange %s: %v", ref, err)
	}
	return reply
}

func wantOutcome(t *testing.T, err error, want Outcome) *LookupError {
	t.Helper()
	var le *LookupError
	if !errors.As(err, &le) || le.Outcome != want {
		t.Fatalf("err = %v; want a LookupError with outcome %s", err, want)
	}
	return le
}

func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

func TestHostileRecordsForOtherNames(t *testing.T) {
	const soa = "cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5"
	srv := dnstest.Start(t, "")
	srv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
		name := q.Question[0].Name
		var m *dns.Msg
		switch q.Question[0].Qtype {
		case dns.TypeA:
			m = hostileReply(t, q,
				name+" 5 IN A 10.1.0.2",
				"evil.example. 5 IN A 192.0.2.1",  // another name
				"cluster.local. 5 IN A 192.0.2.2", // the zone apex
				"x."+name+" 5 IN A 192.0.2.3",     // a child of the name
				name+" 5 IN AAAA fd00::66",        // another type
				"other.example. 5 IN CNAME "+name, // a CNAME towards the name, not from it
				"other.example. 5 IN A 192.0.2.4") // …and its records
			m.Ns = append(m.Ns, hostileReply(t, q, name+" 5 IN A 192.0.2.5", soa).Answer...)
			m.Extra = append(m.Extra, hostileReply(t, q, name+" 5 IN A 192.0.2.6").Answer...)
		case dns.TypeAAAA:
			m = hostileReply(t, q, "evil.example. 5 IN AAAA fd00::66")
			m.Ns = append(m.Ns, hostileReply(t, q, soa).Answer...)
		case dns.TypeSRV:
			m = hostileReply(t, q,
				name+" 5 IN SRV 0 50 8001 a.frontend.bbs.svc.cluster.local.",
				"_http._tcp.evil.example. 5 IN SRV 0 50 8002 b.frontend.bbs.svc.cluster.local.",
				"frontend.bbs.svc.cluster.local. 5 IN SRV 0 50 8003 a.frontend.bbs.svc.cluster.local.")
			m.Extra = hostileReply(t, q,
				"a.frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.5",
				"b.frontend.bbs.svc.cluster.local. 5 IN A 192.0.2.7", // glue of an SRV for another name
				"evil.example. 5 IN A 192.0.2.8",
				name+" 5 IN A 192.0.2.9").Answer
		}
		w.WriteMsg(m)
		return true
	})
	r := &Resolver{Servers: []string{srv.Addr}, Timeout: time.Second}
	res, err := hostileLookup(t, r, "frontend:8001", true, true)
	if err != nil || dials(res.Endpoints) != "10.1.0.2:8001" || res.Outcome != OutcomeSuccess {
		t.Fatalf("A/AAAA: got [%s] %s, %v; want only 10.1.0.2:8001", dials(res.Endpoints), res.Outcome, err)
	}
	res, err = hostileLookup(t, r, "frontend:http", true, true)
	if err != nil || dials(res.Endpoints) != "10.1.0.5:8001" {
		t.Fatalf("SRV: got [%s], %v; want only 10.1.0.5:8001", dials(res.Endpoints), err)
	}
}

func TestHostileSRVTargetWithoutGlue(t *testing.T) {
	srv := dnstest.Start(t, `
_http._tcp.web.bbs.svc.cluster.local. 5 IN SRV 0 50 8080 web-0.web.bbs.svc.cluster.local.
_http._tcp.web.bbs.svc.cluster.local. 5 IN SRV 0 50 8080 gone.web.bbs.svc.cluster.local.
_http._tcp.lost.bbs.svc.cluster.local. 5 IN SRV 0 100 8080 gone.lost.bbs.svc.cluster.local.
_http._tcp.slow.bbs.svc.cluster.local. 5 IN SRV 0 100 8080 mute.slow.bbs.svc.cluster.local.
web-0.web.bbs.svc.cluster.local. 5 IN A 10.1.0.9
`)
	var muted atomic.Int64
	srv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
		switch {
		case strings.HasPrefix(q.Question[0].Name, "mute."):
			muted.Add(1)
			return true // never answered
		case q.Question[0].Qtype == dns.TypeSRV:
			// The SRV answer without its additional section.
			m := hostileReply(t, q)
			for _, rr := range srvAnswer(t, q.Question[0].Name) {
				m.Answer = append(m.Answer, rr)
			}
			w.WriteMsg(m)
			return true
		}
		return false
	})
	r := &Resolver{Servers: []string{srv.Addr}, Timeout: 300 * time.Millisecond}

	// One of two targets does not exist: the other one is used.
	res, err := hostileLookup(t, r, "web:http", true, false)
	if err != nil || dials(res.Endpoints) != "10.1.0.9:8080" {
		t.Fatalf("got [%s], %v; want the resolvable target only", dials(res.Endpoints), err)
	}
	// The only target does not exist: a definite answer without endpoints.
	res, err = hostileLookup(t, r, "lost:http", true, true)
	if err != nil || len(res.Endpoints) != 0 || res.Outcome != OutcomeNoData {
		t.Fatalf("got [%s] %s, %v; want no endpoints, outcome nodata", dials(res.Endpoints), res.Outcome, err)
	}
	// The target's server never answers: transient, the caller keeps its set.
	_, err = hostileLookup(t, r, "slow:http", true, false)
	le := wantOutcome(t, err, OutcomeTimeout)
	if !strings.Contains(err.Error(), "mute.slow.bbs.svc.cluster.local") || muted.Load() == 0 {
		t.Fatalf("error %q should name the SRV target that timed out (%v)", err, le)
	}
}

// srvAnswer is what the zone of TestHostileSRVTargetWithoutGlue holds for name.
func srvAnswer(t *testing.T, name string) []dns.RR {
	targets := map[string][]string{
		"_http._tcp.web.bbs.svc.cluster.local.":  {"web-0.web.bbs.svc.cluster.local.", "gone.web.bbs.svc.cluster.local."},
		"_http._tcp.lost.bbs.svc.cluster.local.": {"gone.lost.bbs.svc.cluster.local."},
		"_http._tcp.slow.bbs.svc.cluster.local.": {"mute.slow.bbs.svc.cluster.local."},
	}
	var rrs []dns.RR
	for _, target := range targets[name] {
		rrs = append(rrs, rr(t, fmt.Sprintf("%s 5 IN SRV 0 50 8080 %s", name, target)))
	}
	return rrs
}

func TestHostileCNAMEs(t *testing.T) {
	const name = "ext.bbs.svc.cluster.local."
	chain := func(n int, last string) []string {
		var recs []string
		prev := name
		for i := range n {
			next := fmt.Sprintf("c%d.example.", i)
			recs = append(recs, prev+" 5 IN CNAME "+next)
			prev = next
		}
		return append(recs, prev+" 5 IN A "+last)
	}
	for _, tc := range []struct {
		name    string
		records []string
		want    string
		outcome Outcome
	}{
		{"chain of MaxCNAMEs", chain(MaxCNAMEs, "192.0.2.10"), "192.0.2.10:80", OutcomeSuccess},
		// A chain past the bound, or a loop without records, is a broken
		// answer (bad_answer: the last good set is kept), not NODATA.
		{"chain one longer than MaxCNAMEs", chain(MaxCNAMEs+1, "192.0.2.11"), "", OutcomeBadAnswer},
		{"chain of 500", chain(500, "192.0.2.12"), "", OutcomeBadAnswer},
		{"loop with an address inside", []string{
			name + " 5 IN CNAME a.example.",
			"a.example. 5 IN CNAME b.example.",
			"b.example. 5 IN CNAME " + name,
			"b.example. 5 IN A 192.0.2.13",
		}, "192.0.2.13:80", OutcomeSuccess},
		{"self loop", []string{name + " 5 IN CNAME " + name}, "", OutcomeBadAnswer},
		{"loop of 200 names", append(chain(199, "192.0.2.14"), "c198.example. 5 IN CNAME "+name), "", OutcomeBadAnswer},
		{"loop of 3 names", []string{
			name + " 5 IN CNAME a.example.",
			"a.example. 5 IN CNAME " + name,
		}, "", OutcomeBadAnswer},
		{"chain ending without records", []string{name + " 5 IN CNAME a.example."}, "", OutcomeNoData},
		{"records for another name only", []string{"other.example. 5 IN A 192.0.2.17"}, "", OutcomeBadAnswer},
		{"two CNAMEs for one name", []string{
			name + " 5 IN CNAME a.example.",
			name + " 5 IN CNAME b.example.",
			"a.example. 5 IN A 192.0.2.15",
			"b.example. 5 IN A 192.0.2.16",
		}, "192.0.2.15:80", OutcomeSuccess},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := dnstest.Start(t, "")
			srv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
				hostileWrite(w, q, hostileReply(t, q, tc.records...))
				return true
			})
			r := &Resolver{Servers: []string{srv.Addr}, Timeout: time.Second}
			res, err := hostileLookup(t, r, name+":80", true, false)
			if tc.outcome == OutcomeBadAnswer {
				wantOutcome(t, err, OutcomeBadAnswer)
				return
			}
			if err != nil || dials(res.Endpoints) != tc.want || res.Outcome != tc.outcome {
				t.Fatalf("got [%s] %s, %v; want [%s] %s", dials(res.Endpoints), res.Outcome, err, tc.want, tc.outcome)
			}
		})
	}
}

// hugeAnswer serves 100,000 A and 100,000 AAAA records for every name: UDP
// replies are truncated to the client's buffer, TCP ones to 64 KiB (with TC,
// as CoreDNS does), so only what fits arrives.
func hugeAnswer(t *testing.T, srv *dnstest.Server) (v4, v6 map[netip.Addr]bool) {
	const n = 100_000
	v4, v6 = make(map[netip.Addr]bool, n), make(map[netip.Addr]bool, n)
	as, aaaas := make([]dns.RR, n), make([]dns.RR, n)
	for i := range n {
		a4 := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		a6 := netip.MustParseAddr(fmt.Sprintf("fd00::%x:%x", i>>16, i&0xffff))
		v4[a4], v6[a6] = true, true
		as[i] = &dns.A{Hdr: dns.RR_Header{Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5}, A: a4.AsSlice()}
		aaaas[i] = &dns.AAAA{Hdr: dns.RR_Header{Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: 5}, AAAA: a6.AsSlice()}
	}
	srv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
		m := new(dns.Msg)
		m.SetReply(q)
		m.Compress = true
		recs := as
		if q.Question[0].Qtype == dns.TypeAAAA {
			recs = aaaas
		}
		m.Answer = make([]dns.RR, len(recs))
		for i, rr := range recs {
			m.Answer[i] = dns.Copy(rr)
			m.Answer[i].Header().Name = q.Question[0].Name
		}
		hostileWrite(w, q, m)
		return true
	})
	return v4, v6
}

func TestHostileHundredThousandRecords(t *testing.T) {
	srv := dnstest.Start(t, "")
	v4, v6 := hugeAnswer(t, srv)
	r := &Resolver{Servers: []string{srv.Addr}, Timeout: 10 * time.Second}
	res, err := hostileLookup(t, r, "huge:80", true, true)
	if err != nil {
		t.Fatal(err)
	}
	// About 4,000 A and 2,300 AAAA records fit in 64 KiB: more than
	// MaxEndpoints together, so the bound cuts.
	if len(res.Endpoints) != MaxEndpoints || res.Dropped == 0 {
		t.Fatalf("got %d endpoints, %d dropped; want exactly MaxEndpoints (%d) and some dropped", len(res.Endpoints), res.Dropped, MaxEndpoints)
	}
	if res.Truncated != 2 || srv.TCPQueries() != 2 {
		t.Fatalf("truncated %d, TCP queries %d; want both questions asked over TCP", res.Truncated, srv.TCPQueries())
	}
	if reply := hostileExchange(t, r, "huge:80", dns.TypeA); !reply.Partial || !reply.Truncated {
		t.Fatalf("reply over TCP: truncated %t, partial %t; want it cut at 64 KiB", reply.Truncated, reply.Partial)
	}
	for i, e := range res.Endpoints {
		if !v4[e.IP] && !v6[e.IP] || e.Port != 80 {
			t.Fatalf("endpoint %s was not served", e.Dial)
		}
		if i > 0 && res.Endpoints[i-1].IP.Compare(e.IP) >= 0 {
			t.Fatalf("not sorted and unique at %d: %s %s", i, res.Endpoints[i-1].Dial, e.Dial)
		}
	}

	// A watcher refreshing it again and again: memory and goroutines stay bounded.
	base := runtime.NumGoroutine()
	heap := heapInUse()
	svc := hostileService(t, "huge:80")
	w := Start(Config{Service: svc, IPv4: true, IPv6: true, Resolver: r, RefreshMin: time.Hour, RefreshMax: time.Hour}, nil)
	for range 5 {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		s, err := w.RefreshNow(ctx)
		cancel()
		if err != nil || len(s.Endpoints) != MaxEndpoints {
			t.Fatalf("refresh: %v, %d endpoints", err, len(s.Endpoints))
		}
	}
	if grown := int64(heapInUse()) - int64(heap); grown > 32<<20 {
		t.Errorf("heap grew by %d MiB over 5 refreshes of a 100,000-record service", grown>>20)
	}
	w.Stop()
	poll.Goroutines(t, base)
}

func TestHostileHundredThousandSRVRecords(t *testing.T) {
	srv := dnstest.Start(t, "")
	srv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
		m := new(dns.Msg)
		m.SetReply(q)
		m.Compress = true
		name := q.Question[0].Name
		switch q.Question[0].Qtype {
		case dns.TypeSRV:
			for i := range 100_000 {
				target := fmt.Sprintf("10-%d-%d-%d.%s", i>>16, i>>8&255, i&255, strings.TrimPrefix(name, "_http._tcp."))
				m.Answer = append(m.Answer, &dns.SRV{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeSRV, Class: dns.ClassINET, Ttl: 5},
					Weight: 1, Port: 8080, Target: target})
				m.Extra = append(m.Extra, &dns.A{Hdr: dns.RR_Header{Name: target, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5},
					A: net.IPv4(10, byte(i>>16), byte(i>>8), byte(i))})
			}
		case dns.TypeA:
			for i := range 100_000 {
				m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5},
					A: net.IPv4(10, byte(i>>16), byte(i>>8), byte(i))})
			}
		}
		hostileWrite(w, q, m)
		return true
	})
	r := &Resolver{Servers: []string{srv.Addr}, Timeout: 10 * time.Second}
	res, err := hostileLookup(t, r, "huge:http", true, false)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(res.Endpoints); n == 0 || n > MaxEndpoints {
		t.Fatalf("got %d endpoints; want some, at most MaxEndpoints", n)
	}
	for _, e := range res.Endpoints {
		if e.Port != 8080 || !e.IP.Is4() || e.IP.As4()[0] != 10 {
			t.Fatalf("endpoint %s was not served", e.Dial)
		}
	}
	if res.Queries > 2+2*MaxTargetLookups {
		t.Fatalf("%d queries for one refresh; the target lookups are bounded by MaxTargetLookups", res.Queries)
	}
}

// One 64 KiB reply can pair 1,500 SRV ports with 2,000 glue addresses of a
// single target: 3 million combinations. The lookup must stay bounded in
// memory and still produce at most MaxEndpoints.
func TestHostileSRVGlueProduct(t *testing.T) {
	srv := dnstest.Start(t, "")
	const target = "t." // short: SRV targets are not compressed
	srv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
		m := new(dns.Msg)
		m.SetReply(q)
		m.Compress = true
		if w.LocalAddr().Network() == "udp" {
			m.Truncated = true
			w.WriteMsg(m)
			return true
		}
		name := q.Question[0].Name
		for i := range 1500 {
			m.Answer = append(m.Answer, &dns.SRV{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeSRV, Class: dns.ClassINET, Ttl: 5},
				Port: uint16(1000 + i), Target: target})
		}
		for i := range 2000 {
			m.Extra = append(m.Extra, &dns.A{Hdr: dns.RR_Header{Name: target, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5},
				A: net.IPv4(10, 3, byte(i>>8), byte(i))})
		}
		if m.Len() > dns.MaxMsgSize {
			t.Errorf("reply is %d bytes, more than fits", m.Len())
		}
		w.WriteMsg(m)
		return true
	})
	r := &Resolver{Servers: []string{srv.Addr}, Timeout: 10 * time.Second}
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	res, err := hostileLookup(t, r, "product:http", true, false)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Endpoints) != MaxEndpoints || res.Dropped == 0 {
		t.Fatalf("got %d endpoints, %d dropped; want MaxEndpoints and the rest dropped", len(res.Endpoints), res.Dropped)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 64<<20 {
		t.Fatalf("one lookup allocated %d MiB", alloc>>20)
	}
}

func TestHostileTruncatedOverTCPToo(t *testing.T) {
	raw := startRaw(t, truncatedUDP, func(q *dns.Msg, c net.Conn) {
		m := hostileReply(t, q)
		if q.Question[0].Qtype == dns.TypeA {
			m = hostileReply(t, q, q.Question[0].Name+" 5 IN A 10.1.0.2", q.Question[0].Name+" 5 IN A 10.1.0.3")
		}
		m.Truncated = true
		writeTCP(c, mustPack(t, m))
	})
	r := &Resolver{Servers: []string{raw.Addr}, Timeout: time.Second}
	// Records with TC over TCP: the server left some out (more than 64 KiB);
	// what arrived is used.
	res, err := hostileLookup(t, r, "tc:80", true, false)
	if err != nil || dials(res.Endpoints) != "10.1.0.2:80 10.1.0.3:80" {
		t.Fatalf("got [%s], %v; want the two records that arrived", dials(res.Endpoints), err)
	}
	if reply := hostileExchange(t, r, "tc:80", dns.TypeA); !reply.Partial {
		t.Fatal("TC over TCP: reply not marked partial")
	}
	// No records with TC over TCP says nothing about the Service: not NODATA
	// (which would empty the set) but a bad answer (which keeps it).
	_, err = hostileLookup(t, r, "tc:80", false, true)
	wantOutcome(t, err, OutcomeBadAnswer)
}

func TestHostileWrongID(t *testing.T) {
	answer := func(q *dns.Msg, id uint16, ip string) []byte {
		m := hostileReply(t, q, q.Question[0].Name+" 5 IN A "+ip)
		m.Id = id
		return mustPack(t, m)
	}
	good := dnstest.Start(t, "wrongid.bbs.svc.cluster.local. 5 IN A 10.1.0.2")

	t.Run("UDP: ignored until the real answer", func(t *testing.T) {
		raw := startRaw(t, func(q *dns.Msg) [][]byte {
			return [][]byte{answer(q, q.Id+1, "192.0.2.1"), answer(q, q.Id^0xffff, "192.0.2.2"), answer(q, q.Id, "10.1.0.7")}
		}, nil)
		r := &Resolver{Servers: []string{raw.Addr}, Timeout: 5 * time.Second}
		res, err := hostileLookup(t, r, "wrongid:80", true, false)
		if err != nil || dials(res.Endpoints) != "10.1.0.7:80" {
			t.Fatalf("got [%s], %v; want only the reply with the query's ID", dials(res.Endpoints), err)
		}
	})
	t.Run("UDP: only wrong IDs, timeout, next server", func(t *testing.T) {
		raw := startRaw(t, func(q *dns.Msg) [][]byte { return [][]byte{answer(q, q.Id+1, "192.0.2.1")} }, nil)
		r := &Resolver{Servers: []string{raw.Addr}, Timeout: 300 * time.Millisecond}
		_, err := hostileLookup(t, r, "wrongid:80", true, false)
		wantOutcome(t, err, OutcomeTimeout)
		r = &Resolver{Servers: []string{raw.Addr, good.Addr}, Timeout: 300 * time.Millisecond}
		res, err := hostileLookup(t, r, "wrongid:80", true, false)
		if err != nil || dials(res.Endpoints) != "10.1.0.2:80" || res.Server != good.Addr {
			t.Fatalf("got [%s] from %s, %v; want the second server's answer", dials(res.Endpoints), res.Server, err)
		}
	})
	t.Run("TCP: an error, next server", func(t *testing.T) {
		raw := startRaw(t, truncatedUDP, func(q *dns.Msg, c net.Conn) { writeTCP(c, answer(q, q.Id+1, "192.0.2.1")) })
		r := &Resolver{Servers: []string{raw.Addr}, Timeout: 5 * time.Second}
		_, err := hostileLookup(t, r, "wrongid:80", true, false)
		wantOutcome(t, err, OutcomeBadAnswer)
		r = &Resolver{Servers: []string{raw.Addr, good.Addr}, Timeout: 5 * time.Second}
		res, err := hostileLookup(t, r, "wrongid:80", true, false)
		if err != nil || dials(res.Endpoints) != "10.1.0.2:80" || res.Server != good.Addr {
			t.Fatalf("got [%s] from %s, %v; want the second server's answer", dials(res.Endpoints), res.Server, err)
		}
	})
}

func TestHostileTCPClosedMidMessage(t *testing.T) {
	full := func(q *dns.Msg) []byte {
		return mustPack(t, hostileReply(t, q, q.Question[0].Name+" 5 IN A 10.1.0.2", q.Question[0].Name+" 5 IN A 10.1.0.3"))
	}
	for _, tc := range []struct {
		name  string
		write func(q *dns.Msg, c net.Conn)
	}{
		{"closed before answering", func(q *dns.Msg, c net.Conn) {}},
		{"half the length prefix", func(q *dns.Msg, c net.Conn) { c.Write([]byte{0}) }},
		{"length prefix only", func(q *dns.Msg, c net.Conn) { c.Write([]byte{0, 200}) }},
		{"half the message", func(q *dns.Msg, c net.Conn) {
			b := full(q)
			c.Write(binary.BigEndian.AppendUint16(nil, uint16(len(b))))
			c.Write(b[:len(b)/2])
		}},
		{"reset", func(q *dns.Msg, c net.Conn) {
			c.(*net.TCPConn).SetLinger(0)
			c.Write([]byte{0, 200, 1, 2})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := startRaw(t, truncatedUDP, tc.write)
			good := dnstest.Start(t, "cut.bbs.svc.cluster.local. 5 IN A 10.1.0.9")
			r := &Resolver{Servers: []string{raw.Addr}, Timeout: 5 * time.Second}
			_, err := hostileLookup(t, r, "cut:80", true, false)
			le := wantOutcome(t, err, OutcomeNetwork)
			if le.Server != raw.Addr {
				t.Fatalf("error names server %s, want %s", le.Server, raw.Addr)
			}
			r.Servers = append(r.Servers, good.Addr)
			res, err := hostileLookup(t, r, "cut:80", true, false)
			if err != nil || dials(res.Endpoints) != "10.1.0.9:80" {
				t.Fatalf("got [%s], %v; want the next server's answer", dials(res.Endpoints), err)
			}
		})
	}
}

func TestHostileSlowAndSilentServers(t *testing.T) {
	done := make(chan struct{})
	slow := dnstest.Start(t, "slow.bbs.svc.cluster.local. 5 IN A 192.0.2.1")
	slow.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
		select { // answers after 5 s (or when the test ends)
		case <-time.After(5 * time.Second):
		case <-done:
		}
		return false
	})
	silent := dnstest.Start(t, "slow.bbs.svc.cluster.local. 5 IN A 192.0.2.2")
	silent.Mute(true)
	good := dnstest.Start(t, "slow.bbs.svc.cluster.local. 5 IN A 10.1.0.2")
	release := sync.OnceFunc(func() { close(done) })
	t.Cleanup(release) // before the servers close

	for _, bad := range []*dnstest.Server{slow, silent} {
		r := &Resolver{Servers: []string{bad.Addr}, Timeout: 300 * time.Millisecond}
		_, err := hostileLookup(t, r, "slow:80", true, false)
		wantOutcome(t, err, OutcomeTimeout)

		r = &Resolver{Servers: []string{bad.Addr, good.Addr}, Timeout: 300 * time.Millisecond}
		res, err := hostileLookup(t, r, "slow:80", true, false)
		if err != nil || dials(res.Endpoints) != "10.1.0.2:80" || res.Server != good.Addr {
			t.Fatalf("got [%s] from %s, %v; want the second server's answer", dials(res.Endpoints), res.Server, err)
		}
		// The server that answered is asked first from now on.
		before := bad.Queries()
		if _, err := hostileLookup(t, r, "slow:80", true, false); err != nil || bad.Queries() != before {
			t.Fatalf("%v; the failing server was asked again (%d queries)", err, bad.Queries()-before)
		}
	}

	// A watcher waiting on a server that never answers stops at once, leaving
	// nothing behind.
	release() // the slow server's handlers return
	base := runtime.NumGoroutine()
	asked := silent.Queries()
	w := Start(Config{Service: hostileService(t, "slow:80"), IPv4: true,
		Resolver: &Resolver{Servers: []string{silent.Addr}, Timeout: time.Minute}, RefreshMin: time.Hour}, nil)
	for silent.Queries() == asked {
		time.Sleep(time.Millisecond) // until the lookup is in flight
	}
	stopped := make(chan struct{})
	go func() { w.Stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(30 * time.Second):
		t.Fatal("Stop hung on a lookup in flight")
	}
	poll.Goroutines(t, base)
}

func TestHostileServFailThenRecovery(t *testing.T) {
	srv := dnstest.Start(t, bbsZone)
	base := runtime.NumGoroutine()
	w, logs := startWatcher(t, srv, "frontend:8001", nil)
	s := refreshNow(t, w)
	if dials(s.Endpoints) != "10.1.0.2:8001 10.1.0.3:8001" {
		t.Fatalf("first lookup: [%s], want both endpoints", dials(s.Endpoints))
	}
	srv.Fail(dns.RcodeServerFailure)
	for range 3 {
		s = refreshNow(t, w)
		if dials(s.Endpoints) != "10.1.0.2:8001 10.1.0.3:8001" || !s.Stale() || s.Outcome != OutcomeServFail || s.Err == nil {
			t.Fatalf("during SERVFAIL: [%s] stale=%t outcome %s err %v; want the last good set kept, marked stale",
				dials(s.Endpoints), s.Stale(), s.Outcome, s.Err)
		}
	}
	if n := logs.FilterMessageSnippet("keeping 2 endpoints").Len(); n != 1 {
		t.Fatalf("%d 'keeping 2 endpoints' warnings for one run of identical failures, want 1", n)
	}
	srv.Fail(-1)
	s = refreshNow(t, w)
	if dials(s.Endpoints) != "10.1.0.2:8001 10.1.0.3:8001" || s.Stale() || s.Err != nil || s.Outcome != OutcomeSuccess {
		t.Fatalf("after recovery: [%s] stale=%t err %v outcome %s", dials(s.Endpoints), s.Stale(), s.Err, s.Outcome)
	}
	if logs.FilterMessage("DNS refresh recovered").Len() != 1 {
		t.Fatalf("recovery not logged once")
	}
	w.Stop()
	poll.Goroutines(t, base)
}

func TestHostileFlapping(t *testing.T) {
	srv := dnstest.Start(t, bbsZone)
	var n atomic.Int64
	srv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
		if n.Add(1)%2 == 0 {
			m := new(dns.Msg)
			m.SetRcode(q, dns.RcodeNameError)
			m.Ns = []dns.RR{rr(t, dnstest.SOA)}
			w.WriteMsg(m)
			return true
		}
		return false
	})
	base := runtime.NumGoroutine()
	w, _ := startWatcher(t, srv, "frontend:8001", func(c *Config) { c.IPv6 = false })
	for i := range 6 {
		s := refreshNow(t, w)
		if s.Seq%2 == 1 { // odd lookups get NOERROR, even ones NXDOMAIN
			if dials(s.Endpoints) != "10.1.0.2:8001 10.1.0.3:8001" || s.Unavailable != nil || s.Outcome != OutcomeSuccess {
				t.Fatalf("round %d (NOERROR): [%s] %s %v", i, dials(s.Endpoints), s.Outcome, s.Unavailable)
			}
		} else {
			if len(s.Endpoints) != 0 || s.Unavailable == nil || s.Outcome != OutcomeNXDomain || s.Stale() {
				t.Fatalf("round %d (NXDOMAIN): [%s] %s stale=%t; want the set emptied", i, dials(s.Endpoints), s.Outcome, s.Stale())
			}
			if !strings.Contains(s.Unavailable.Error(), "frontend.bbs.svc.cluster.local") {
				t.Fatalf("the error for requests does not name the service: %v", s.Unavailable)
			}
		}
	}
	w.Stop()
	poll.Goroutines(t, base)
}

func TestHostileExtremeTTLs(t *testing.T) {
	for _, tc := range []struct {
		ttl     uint32
		wantTTL time.Duration
	}{
		{0, time.Second}, // "do not cache": check again at the minimum
		{1<<31 - 1, (1<<31 - 1) * time.Second},
		{1 << 31, time.Second}, // RFC 2181 §8: the top bit set means 0
		{1<<32 - 1, time.Second},
	} {
		t.Run(fmt.Sprint(tc.ttl), func(t *testing.T) {
			srv := dnstest.Start(t, fmt.Sprintf("ttl.bbs.svc.cluster.local. %d IN A 10.1.0.2", tc.ttl))
			r := &Resolver{Servers: []string{srv.Addr}, Timeout: time.Second}
			res, err := hostileLookup(t, r, "ttl:80", true, false)
			if err != nil || res.TTL != tc.wantTTL {
				t.Fatalf("TTL %d: got %s, %v; want %s", tc.ttl, res.TTL, err, tc.wantTTL)
			}
			const lo, hi = 2 * time.Second, time.Hour
			w, _ := startWatcher(t, srv, "ttl:80", func(c *Config) { c.IPv6, c.RefreshMin, c.RefreshMax = false, lo, hi })
			s := refreshNow(t, w)
			// jitter adds up to 10%.
			if d := s.Next.Sub(s.Resolved); d < lo || d > hi+hi/10 {
				t.Fatalf("TTL %d: next lookup in %s, outside the refresh bounds [%s, %s] (+10%%)", tc.ttl, d, lo, hi)
			}
			if want := clamp(tc.wantTTL, lo, hi); s.Next.Sub(s.Resolved) < want || s.Next.Sub(s.Resolved) > want+want/10+time.Millisecond {
				t.Fatalf("TTL %d: next lookup in %s, want %s plus up to 10%%", tc.ttl, s.Next.Sub(s.Resolved), want)
			}
		})
	}
}

// One watcher through every kind of broken server: transient failures keep the
// last good set (marked stale), an NXDOMAIN answer empties it, a good answer
// brings it back.
func TestHostileWatcherKeepsLastGoodSet(t *testing.T) {
	var mode atomic.Value
	mode.Store("good")
	good := func(q *dns.Msg) *dns.Msg {
		return hostileReply(t, q, q.Question[0].Name+" 5 IN A 10.1.0.2", q.Question[0].Name+" 5 IN A 10.1.0.3")
	}
	raw := startRaw(t, func(q *dns.Msg) [][]byte {
		switch mode.Load() {
		case "good":
			return [][]byte{mustPack(t, good(q))}
		case "nxdomain":
			m := new(dns.Msg)
			m.SetRcode(q, dns.RcodeNameError)
			m.Ns = []dns.RR{rr(t, dnstest.SOA)}
			return [][]byte{mustPack(t, m)}
		case "garbage":
			return [][]byte{append(binary.BigEndian.AppendUint16(nil, q.Id), 0x84, 0, 0, 1, 0, 1, 0, 0, 0, 0, 3, 'x')}
		case "wrong question":
			m := good(q)
			m.Question[0].Name = "evil.example."
			return [][]byte{mustPack(t, m)}
		case "silent":
			return nil
		}
		name := q.Question[0].Name
		if recs, ok := map[string][]string{
			"cname loop":       {name + " 5 IN CNAME a.example.", "a.example. 5 IN CNAME " + name},
			"cname chain of 9": cnameChain9(name),
			"other names only": {"evil.example. 5 IN A 192.0.2.1"},
			"loopback only":    {name + " 5 IN A 127.0.0.1"},
			"metadata only":    {name + " 5 IN A 169.254.169.254"},
		}[mode.Load().(string)]; ok {
			return [][]byte{mustPack(t, hostileReply(t, q, recs...))}
		}
		return truncatedUDP(q) // the TCP cases
	}, func(q *dns.Msg, c net.Conn) {
		switch mode.Load() {
		case "tcp wrong id":
			m := good(q)
			m.Id++
			writeTCP(c, mustPack(t, m))
		case "tcp cut":
			b := mustPack(t, good(q))
			c.Write(binary.BigEndian.AppendUint16(nil, uint16(len(b))))
			c.Write(b[:len(b)-3])
		case "tcp truncated empty":
			m := hostileReply(t, q)
			m.Truncated = true
			writeTCP(c, mustPack(t, m))
		}
	})
	base := runtime.NumGoroutine()
	heap := heapInUse()
	w := Start(Config{Service: hostileService(t, "flaky:80"), IPv4: true,
		Resolver:   &Resolver{Servers: []string{raw.Addr}, Timeout: 300 * time.Millisecond},
		RefreshMin: time.Hour, RefreshMax: time.Hour}, nil)
	refresh := func() *Snapshot {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		s, err := w.RefreshNow(ctx)
		if err != nil {
			t.Fatalf("RefreshNow: %v", err)
		}
		return s
	}
	const both = "10.1.0.2:80 10.1.0.3:80"
	if s := refresh(); dials(s.Endpoints) != both {
		t.Fatalf("first lookup: [%s]", dials(s.Endpoints))
	}
	for _, tc := range []struct {
		mode    string
		outcome Outcome
	}{
		{"silent", OutcomeTimeout},
		{"garbage", OutcomeBadAnswer},
		{"wrong question", OutcomeBadAnswer},
		{"tcp wrong id", OutcomeBadAnswer},
		{"tcp cut", OutcomeNetwork},
		{"tcp truncated empty", OutcomeBadAnswer},
		{"cname loop", OutcomeBadAnswer},
		{"cname chain of 9", OutcomeBadAnswer},
		{"other names only", OutcomeBadAnswer},
		{"loopback only", OutcomeBadAnswer},
		{"metadata only", OutcomeBadAnswer},
	} {
		mode.Store(tc.mode)
		s := refresh()
		if dials(s.Endpoints) != both || !s.Stale() || s.Outcome != tc.outcome || s.Unavailable != nil {
			t.Fatalf("%s: [%s] stale=%t outcome %s unavailable %v; want the last good set kept, outcome %s",
				tc.mode, dials(s.Endpoints), s.Stale(), s.Outcome, s.Unavailable, tc.outcome)
		}
		mode.Store("good")
		if s := refresh(); dials(s.Endpoints) != both || s.Stale() || s.Err != nil {
			t.Fatalf("after %s: [%s] stale=%t err %v", tc.mode, dials(s.Endpoints), s.Stale(), s.Err)
		}
	}
	mode.Store("nxdomain")
	if s := refresh(); len(s.Endpoints) != 0 || s.Outcome != OutcomeNXDomain || s.Unavailable == nil {
		t.Fatalf("NXDOMAIN: [%s] %s; want the set emptied", dials(s.Endpoints), s.Outcome)
	}
	mode.Store("silent")
	if s := refresh(); len(s.Endpoints) != 0 || s.Outcome != OutcomeTimeout || s.Unavailable == nil {
		t.Fatalf("timeout after NXDOMAIN: [%s] %s; want still empty", dials(s.Endpoints), s.Outcome)
	}
	w.Stop()
	poll.Goroutines(t, base)
	if grown := int64(heapInUse()) - int64(heap); grown > 8<<20 {
		t.Errorf("heap grew by %d MiB", grown>>20)
	}
}

// cnameChain9 is a chain of MaxCNAMEs+1 CNAMEs from name, then an address.
func cnameChain9(name string) []string {
	var recs []string
	prev := name
	for i := range MaxCNAMEs + 1 {
		next := fmt.Sprintf("c%d.example.", i)
		recs = append(recs, prev+" 5 IN CNAME "+next)
		prev = next
	}
	return append(recs, prev+" 5 IN A 192.0.2.10")
}

// SRV targets without glue that are not the Service's own endpoint names
// are looked up one by one, at most MaxTargetLookups of them per refresh;
// the rest are dropped and counted.
func TestHostileSRVTargetsWithoutGlueBounded(t *testing.T) {
	const targets = 3 * MaxTargetLookups
	srv := dnstest.Start(t, "")
	srv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
		if q.Question[0].Qtype != dns.TypeSRV {
			return false // the targets: NXDOMAIN
		}
		m := new(dns.Msg)
		m.SetReply(q)
		m.Compress = true
		for i := range targets {
			m.Answer = append(m.Answer, &dns.SRV{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeSRV, Class: dns.ClassINET, Ttl: 5},
				Weight: 1, Port: 8080, Target: fmt.Sprintf("t%d.elsewhere.example.", i)})
		}
		hostileWrite(w, q, m)
		return true
	})
	r := &Resolver{Servers: []string{srv.Addr}, Timeout: 10 * time.Second}
	res, err := hostileLookup(t, r, "huge:http", true, false)
	if err != nil {
		t.Fatal(err)
	}
	if res.Queries > 1+MaxTargetLookups || res.Dropped < targets-MaxTargetLookups {
		t.Fatalf("%d queries, %d dropped for %d bare targets; want at most 1+MaxTargetLookups (%d) and the rest dropped",
			res.Queries, res.Dropped, targets, 1+MaxTargetLookups)
	}
}

// D3: A answers, AAAA does not (REFUSED, SERVFAIL, dropped): the A records
// are used and the warning names the family that failed. Once the Service
// has IPv6 endpoints, an AAAA failure keeps them rather than dropping them.
func TestHostileOneFamilyFails(t *testing.T) {
	for _, c := range []struct {
		name  string
		rcode int // -1: no answer at all
	}{{"refused", dns.RcodeRefused}, {"servfail", dns.RcodeServerFailure}, {"dropped", -1}} {
		t.Run(c.name, func(t *testing.T) {
			srv := dnstest.Start(t, bbsZone+"\nfrontend.bbs.svc.cluster.local. 5 IN AAAA fd00::2\n")
			var failAAAA atomic.Bool
			failAAAA.Store(true)
			srv.Hook(func(w dns.ResponseWriter, q *dns.Msg) bool {
				if q.Question[0].Qtype != dns.TypeAAAA || !failAAAA.Load() {
					return false
				}
				if c.rcode >= 0 {
					m := new(dns.Msg)
					m.SetRcode(q, c.rcode)
					w.WriteMsg(m)
				}
				return true
			})
			w, logs := startWatcher(t, srv, "frontend:8001", nil)
			s := w.Wait(context.Background(), 10*time.Second)
			if s == nil || dials(s.Endpoints) != "10.1.0.2:8001 10.1.0.3:8001" || s.Outcome != OutcomeSuccess {
				t.Fatalf("snapshot %+v; want the A records", s)
			}
			warn := logs.FilterMessageSnippet("AAAA records failed").All()
			if len(warn) != 1 || !strings.Contains(fmt.Sprint(warn[0].ContextMap()["hint"]), "versions ipv4") {
				t.Fatalf("warnings %+v; want one naming AAAA and suggesting versions ipv4", logs.All())
			}
			// AAAA answers: dual-stack. Then it fails again: the IPv6
			// endpoint is kept, as when a whole lookup fails.
			failAAAA.Store(false)
			if s = refreshNow(t, w); dials(s.Endpoints) != "10.1.0.2:8001 10.1.0.3:8001 [fd00::2]:8001" {
				t.Fatalf("dual stack: [%s]", dials(s.Endpoints))
			}
			failAAAA.Store(true)
			if s = refreshNow(t, w); dials(s.Endpoints) != "10.1.0.2:8001 10.1.0.3:8001 [fd00::2]:8001" || !s.Stale() {
				t.Fatalf("AAAA failing after dual stack: [%s] stale %t; want all kept, stale", dials(s.Endpoints), s.Stale())
			}
		})
	}
}
