// Package dnstest runs an in-process DNS server that answers the way CoreDNS's
// kubernetes plugin does for headless Services (see docs/kube-dns-answers.md):
// authoritative answers, NXDOMAIN with the zone's SOA for names without records,
// NODATA (SOA, no answer) for names with records of other types only, SRV
// targets' addresses in the additional section, EDNS0-sized UDP replies with TC
// set when they do not fit, and up to 64 KiB over TCP (TC set if even that
// does not hold everything, as CoreDNS does).
//
// Its contents are zone-file text, so a test reads like the DNS it describes:
//
//	srv := dnstest.Start(t, `
//	    frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.2
//	    frontend.bbs.svc.cluster.local. 5 IN A 10.1.0.3
//	`)
//
// Tests can also make it misbehave: fail with an rcode, stop answering, or
// answer through a hook.
package dnstest

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/miekg/dns"
)

// SOA is the zone's SOA record, as CoreDNS serves it for cluster.local.
const SOA = "cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1700000000 7200 1800 86400 5"

// Server is a running test DNS server, on UDP and TCP of the same loopback port.
type Server struct {
	// Addr is host:port for both UDP and TCP.
	Addr string

	udp, tcp *dns.Server

	mu      sync.Mutex
	records map[string][]dns.RR // by lowercased owner name
	soa     dns.RR
	rcode   int  // forced rcode; -1 for none
	mute    bool // drop queries
	hook    func(w dns.ResponseWriter, q *dns.Msg) bool

	queries atomic.Int64
	tcpQs   atomic.Int64
}

// Start serves zone (zone-file lines) on 127.0.0.1 until the test ends.
func Start(t testing.TB, zone string) *Server {
	t.Helper()
	s, err := Listen("127.0.0.1:0", zone)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// Listen serves zone on addr (UDP and TCP of the same port).
func Listen(addr, zone string) (*Server, error) {
	s := &Server{rcode: -1}
	if err := s.Set(zone); err != nil {
		return nil, err
	}
	// Bind UDP first, then TCP on the same port (retrying if taken).
	var pc net.PacketConn
	var l net.Listener
	var err error
	for range 20 {
		if pc, err = net.ListenPacket("udp", addr); err != nil {
			return nil, err
		}
		if l, err = net.Listen("tcp", pc.LocalAddr().String()); err == nil {
			break
		}
		pc.Close()
	}
	if err != nil {
		return nil, err
	}
	s.Addr = pc.LocalAddr().String()
	h := dns.HandlerFunc(s.serve)
	s.udp = &dns.Server{PacketConn: pc, Handler: h}
	s.tcp = &dns.Server{Listener: l, Handler: h}
	for _, srv := range []*dns.Server{s.udp, s.tcp} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go srv.ActivateAndServe()
		<-started
	}
	return s, nil
}

// Close stops the server.
func (s *Server) Close() {
	s.udp.Shutdown()
	s.tcp.Shutdown()
}

// Set replaces the zone's records with the zone-file lines given (blank lines
// and ";" comments allowed). An SOA line replaces the default SOA.
func (s *Server) Set(zone string) error {
	recs := map[string][]dns.RR{}
	soa, _ := dns.NewRR(SOA)
	for i, line := range strings.Split(zone, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, ";") {
			continue
		}
		rr, err := dns.NewRR(line)
		if err != nil {
			return fmt.Errorf("zone line %d %q: %v", i+1, line, err)
		}
		if rr.Header().Rrtype == dns.TypeSOA {
			soa = rr
			continue
		}
		name := strings.ToLower(rr.Header().Name)
		recs[name] = append(recs[name], rr)
	}
	s.mu.Lock()
	s.records, s.soa = recs, soa
	s.mu.Unlock()
	return nil
}

// MustSet is Set for tests.
func (s *Server) MustSet(t testing.TB, zone string) {
	t.Helper()
	if err := s.Set(zone); err != nil {
		t.Fatal(err)
	}
}

// Fail makes every answer carry rcode (dns.RcodeServerFailure, …); -1 restores normal answers.
func (s *Server) Fail(rcode int) { s.mu.Lock(); s.rcode = rcode; s.mu.Unlock() }

// Mute makes the server read queries and never answer (a timeout), or answer again.
func (s *Server) Mute(on bool) { s.mu.Lock(); s.mute = on; s.mu.Unlock() }

// Hook lets a test answer (or not) by itself; returning false falls back to the zone.
func (s *Server) Hook(f func(w dns.ResponseWriter, q *dns.Msg) bool) {
	s.mu.Lock()
	s.hook = f
	s.mu.Unlock()
}

// Queries is the number of queries received; TCPQueries those over TCP.
func (s *Server) Queries() int64    { return s.queries.Load() }
func (s *Server) TCPQueries() int64 { return s.tcpQs.Load() }

func (s *Server) serve(w dns.ResponseWriter, q *dns.Msg) {
	s.queries.Add(1)
	tcp := w.LocalAddr().Network() == "tcp"
	if tcp {
		s.tcpQs.Add(1)
	}
	s.mu.Lock()
	rcode, mute, hook := s.rcode, s.mute, s.hook
	m := s.answer(q)
	s.mu.Unlock()
	if hook != nil && hook(w, q) {
		return
	}
	if mute {
		return
	}
	if rcode >= 0 {
		m = new(dns.Msg)
		m.SetRcode(q, rcode)
	}
	// Like CoreDNS (request.Scrub): fit UDP replies to the client's buffer and
	// TCP replies to 64 KiB, dropping additional records first and setting TC.
	size := dns.MaxMsgSize
	if !tcp {
		size = dns.MinMsgSize
		if o := q.IsEdns0(); o != nil {
			size = int(o.UDPSize())
		}
	}
	m.Truncate(size)
	w.WriteMsg(m)
}

// answer builds the reply from the zone, holding s.mu.
func (s *Server) answer(q *dns.Msg) *dns.Msg {
	m := new(dns.Msg)
	m.SetReply(q)
	m.Authoritative = true
	if o := q.IsEdns0(); o != nil {
		m.SetEdns0(o.UDPSize(), false)
	}
	if len(q.Question) != 1 {
		m.Rcode = dns.RcodeFormatError
		return m
	}
	qn := strings.ToLower(q.Question[0].Name)
	qt := q.Question[0].Qtype
	recs, ok := s.records[qn]
	if !ok {
		m.Rcode = dns.RcodeNameError
		m.Ns = []dns.RR{s.soa}
		return m
	}
	for _, rr := range recs {
		if rr.Header().Rrtype == qt {
			m.Answer = append(m.Answer, rr)
		} else if rr.Header().Rrtype == dns.TypeCNAME && qt != dns.TypeCNAME {
			// ExternalName: the CNAME, then what the zone knows of its target.
			m.Answer = append(m.Answer, rr)
			for _, t := range s.records[strings.ToLower(rr.(*dns.CNAME).Target)] {
				if t.Header().Rrtype == qt {
					m.Answer = append(m.Answer, t)
				}
			}
		}
	}
	if len(m.Answer) == 0 {
		m.Ns = []dns.RR{s.soa}
		return m
	}
	if qt == dns.TypeSRV {
		for _, rr := range m.Answer {
			if srv, ok := rr.(*dns.SRV); ok {
				for _, t := range s.records[strings.ToLower(srv.Target)] {
					if tt := t.Header().Rrtype; tt == dns.TypeA || tt == dns.TypeAAAA {
						m.Extra = append(m.Extra, t)
					}
				}
			}
		}
	}
	return m
}
