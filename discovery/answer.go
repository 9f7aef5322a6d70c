package discovery

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// Bounds on what one answer may contribute.
const (
	// MaxEndpoints is the most endpoints taken from one lookup; the rest are
	// dropped and counted in Result.Dropped.
	MaxEndpoints = 4096
	// MaxCNAMEs is the longest CNAME chain followed inside one answer.
	MaxCNAMEs = 8
	// MaxTargetLookups is the most SRV targets without glue looked up per refresh.
	MaxTargetLookups = 64
	// fallbackTTL is used when an answer carries no usable TTL (no records, no SOA).
	fallbackTTL = 5 * time.Second
	// maxCandidates bounds the endpoints gathered in one refresh before they
	// are sorted and cut to MaxEndpoints: a single 64 KiB reply can pair 1,500
	// SRV ports with 2,000 glue addresses of one target, 3 million pairs. Real
	// answers have one or two addresses per SRV record, far below this.
	maxCandidates = 4 * MaxEndpoints
)

// Endpoint is one address to dial.
type Endpoint struct {
	IP   netip.Addr
	Port uint16
	// Target is the SRV target the address came from; empty for A/AAAA lookups.
	Target string
	// Dial is "IP:port" (IPv6 in brackets), precomputed for the request path.
	Dial string
}

// Result is what one refresh of a Service found.
type Result struct {
	// Endpoints, sorted by address then port, without duplicates. Empty when
	// Outcome is NXDOMAIN or NODATA.
	Endpoints []Endpoint
	// Outcome is success, nxdomain or nodata (transient failures are errors).
	Outcome Outcome
	// TTL is the smallest TTL of the records used (the negative-caching TTL of
	// the SOA for NXDOMAIN/NODATA).
	TTL time.Duration
	// Server is the DNS server that answered.
	Server string
	// Queries, Truncated: how many questions were asked, and how many UDP
	// replies were truncated and asked again over TCP.
	Queries, Truncated int
	// Dropped counts records ignored because a bound was reached.
	Dropped int
	// Refused are the endpoints the Config's AddressPolicy did not allow
	// (at most maxRefusedListed of them; RefusedCount counts all).
	Refused      []RefusedEndpoint
	RefusedCount int
	// Partial is set when one family's question (A or AAAA) failed and the
	// other's gave addresses: Endpoints are of the family that answered.
	Partial error

	// malformed says why an answer without usable records was not taken as
	// NODATA (a CNAME chain past MaxCNAMEs, a loop, records for other names
	// only); Lookup then fails with bad_answer.
	malformed error
}

// Lookup resolves svc once: A and/or AAAA records of the FQDN plus the
// configured port, or the SRV records of the named port with their targets'
// addresses. A non-nil error is transient (timeout, SERVFAIL, REFUSED, network,
// malformed): the caller should keep what it had.
//
// Addresses that can never be an endpoint (see unusable) are dropped and
// listed in Result.Refused; Lookup applies no AddressPolicy beyond that.
func (r *Resolver) Lookup(ctx context.Context, svc Service, v4, v6 bool) (Result, error) {
	return r.lookup(ctx, svc, v4, v6, nil)
}

// LookupAllowed is Lookup that also drops the endpoints p refuses, before
// MaxEndpoints cuts the set: refused records must not crowd out good ones.
// An answer whose every endpoint is refused is a bad_answer error, not "no
// ready endpoints": it must not empty a good set.
func (r *Resolver) LookupAllowed(ctx context.Context, svc Service, v4, v6 bool, p AddressPolicy) (Result, error) {
	return r.lookup(ctx, svc, v4, v6, &p)
}

func (r *Resolver) lookup(ctx context.Context, svc Service, v4, v6 bool, policy *AddressPolicy) (Result, error) {
	var types []uint16
	if v4 {
		types = append(types, dns.TypeA)
	}
	if v6 {
		types = append(types, dns.TypeAAAA)
	}
	res := Result{Outcome: OutcomeNXDomain}
	var eps []Endpoint
	if !svc.SRV() {
		// One family failing (a server that REFUSEs AAAA, drops it or answers
		// it slowly) must not throw away the other's answer.
		partial := func(err error) bool {
			if len(types) == 1 || res.Partial != nil || ctx.Err() != nil {
				return false
			}
			res.Partial = err
			return true
		}
		err := r.askFamilies(ctx, svc.FQDN, types, &res, partial, func(t uint16, m *dns.Msg) {
			got, _ := endpointsFromReply(m, svc, t, types, &res)
			eps = append(eps, got...)
		})
		if err != nil {
			return res, err
		}
		if res.Partial != nil && len(eps) == 0 {
			// The family that answered has nothing: that is no answer while
			// the other failed.
			return res, res.Partial
		}
	} else {
		var err error
		if eps, err = r.lookupSRV(ctx, svc, types, &res); err != nil {
			return res, err
		}
	}
	res.Endpoints = finish(res.admit(svc, eps, policy), &res.Dropped)
	if len(res.Endpoints) == 0 && res.RefusedCount > 0 {
		// Only refused addresses: not "no ready endpoints" either.
		return res, &LookupError{Name: svc.QName(), Type: svc.qtype(), Server: res.Server, Outcome: OutcomeBadAnswer,
			Err: fmt.Errorf("every address in the answer is refused (%s): %s", res.Refused[0], hintFor(res.Refused[0].Reason))}
	}
	if len(res.Endpoints) == 0 && res.malformed != nil {
		// Not "no ready endpoints": the answer is broken, keep the last good set.
		return res, &LookupError{Name: svc.QName(), Type: svc.qtype(), Server: res.Server, Outcome: OutcomeBadAnswer, Err: res.malformed}
	}
	if len(res.Endpoints) > 0 {
		res.Outcome = OutcomeSuccess
	} else if res.Outcome == OutcomeSuccess {
		// SRV records whose targets have no usable address: nothing to dial,
		// and the logs and metrics must not call that a success.
		res.Outcome = OutcomeNoData
	}
	if res.TTL == 0 && res.Outcome != OutcomeSuccess {
		res.TTL = fallbackTTL
	}
	return res, nil
}

// qtype is the record type a lookup of s asks first, for errors.
func (s Service) qtype() uint16 {
	if s.SRV() {
		return dns.TypeSRV
	}
	return dns.TypeA
}

func (r *Resolver) lookupSRV(ctx context.Context, svc Service, types []uint16, res *Result) ([]Endpoint, error) {
	qname := svc.QName()
	reply, err := r.Exchange(ctx, qname, dns.TypeSRV)
	res.account(reply, err)
	if err != nil {
		return nil, err
	}
	eps, bare := endpointsFromReply(reply.Msg, svc, dns.TypeSRV, types, res)
	if len(bare) == 0 {
		return eps, nil
	}
	// More bare targets than we look up one by one: a Service so big that even
	// the 64 KiB TCP reply had no room for all the glue. If the targets are the
	// Service's own endpoint names on one port (as cluster DNS makes them), the
	// Service name's A/AAAA records are exactly their addresses.
	if len(bare) > MaxTargetLookups {
		if port, ok := endpointNamesOnOnePort(bare, svc.FQDN); ok {
			err := r.askFamilies(ctx, svc.FQDN, types, res, nil, func(t uint16, m *dns.Msg) {
				ips, tttl, _ := addresses(m, svc.FQDN, t, &res.Dropped)
				if len(ips) > 0 { // a NODATA for the other family does not shorten it
					res.TTL = minTTL(res.TTL, tttl)
				}
				for _, ip := range ips {
					eps = append(eps, Endpoint{IP: ip, Port: port})
				}
			})
			if err != nil {
				return nil, fmt.Errorf("addresses of %s for SRV targets without glue: %w", strings.TrimSuffix(svc.FQDN, "."), err)
			}
			return eps, nil
		}
		res.Dropped += len(bare) - MaxTargetLookups
		bare = bare[:MaxTargetLookups]
	}
	for _, srv := range bare {
		target := strings.ToLower(srv.Target)
		err := r.askFamilies(ctx, target, types, res, nil, func(t uint16, m *dns.Msg) {
			ips, tttl, _ := addresses(m, target, t, &res.Dropped)
			if len(ips) > 0 {
				res.TTL = minTTL(res.TTL, tttl)
			}
			for _, ip := range capCandidates(ips, len(eps), res) {
				eps = append(eps, Endpoint{IP: ip, Port: srv.Port, Target: target})
			}
		})
		if err != nil {
			return nil, fmt.Errorf("SRV target %s of %s: %w", strings.TrimSuffix(target, "."), strings.TrimSuffix(qname, "."), err)
		}
	}
	return eps, nil
}

// askFamilies asks name's question of each of types (A, AAAA) in turn,
// counting each in res, and hands every answer to take. A failed question
// ends the loop with its error unless tolerate (nil: none) takes it and says
// to go on with the next family. Lookup, the names fallback and each SRV
// target without glue all ask this way; what they take differs.
func (r *Resolver) askFamilies(ctx context.Context, name string, types []uint16, res *Result,
	tolerate func(error) bool, take func(qtype uint16, m *dns.Msg)) error {
	for _, t := range types {
		reply, err := r.Exchange(ctx, name, t)
		res.account(reply, err)
		if err != nil {
			if tolerate != nil && tolerate(err) {
				continue
			}
			return err
		}
		take(t, reply.Msg)
	}
	return nil
}

// endpointNamesOnOnePort reports whether every SRV record points at a direct
// child of fqdn (CoreDNS's "<hostname or dashed IP>.<service>" names) with the
// same port, and that port.
func endpointNamesOnOnePort(srvs []*dns.SRV, fqdn string) (uint16, bool) {
	port := srvs[0].Port
	for _, s := range srvs {
		host, parent, _ := strings.Cut(strings.ToLower(s.Target), ".")
		if s.Port != port || host == "" || parent != fqdn {
			return 0, false
		}
	}
	return port, true
}

// endpointsFromReply turns one reply into endpoints: for qtype A or AAAA the
// addresses of svc's FQDN with svc's port, for SRV the records of svc's QName
// with their targets' glue of the wanted types. SRV records whose target has no
// glue come back in bare, for the caller to look up. The reply's outcome and
// TTL are merged into res. Lookup and FuzzAnswer both go through here.
func endpointsFromReply(m *dns.Msg, svc Service, qtype uint16, types []uint16, res *Result) (eps []Endpoint, bare []*dns.SRV) {
	if qtype != dns.TypeSRV {
		ips, ttl, outcome := addresses(m, svc.FQDN, qtype, &res.Dropped)
		res.merge(outcome, ttl)
		res.noteMalformed(m, svc.FQDN, qtype, outcome)
		for _, ip := range ips {
			eps = append(eps, Endpoint{IP: ip, Port: svc.Port})
		}
		return eps, nil
	}
	srvs, ttl, outcome := srvRecords(m, svc.QName(), &res.Dropped)
	res.merge(outcome, ttl)
	res.noteMalformed(m, svc.QName(), dns.TypeSRV, outcome)
	glue := glueAddresses(m, srvs, types)
	for _, srv := range srvs {
		target := strings.ToLower(srv.Target)
		ips, ok := glue[target]
		if !ok {
			if srv.Port == 0 { // nothing to dial whatever its addresses: do not look them up
				res.refuse(svc, Endpoint{Target: target}, RefusedPort0)
				continue
			}
			bare = append(bare, srv)
			continue
		}
		for _, ip := range capCandidates(ips, len(eps), res) {
			eps = append(eps, Endpoint{IP: ip, Port: srv.Port, Target: target})
		}
	}
	return eps, bare
}

// capCandidates returns the part of ips that fits beside have endpoints within
// maxCandidates, counting the rest as dropped.
func capCandidates(ips []netip.Addr, have int, res *Result) []netip.Addr {
	n := max(0, min(len(ips), maxCandidates-have))
	res.Dropped += len(ips) - n
	return ips[:n]
}

// account records what a question cost.
func (res *Result) account(reply Reply, err error) {
	res.Queries++
	if reply.Truncated {
		res.Truncated++
	}
	if err == nil {
		res.Server = reply.Server
	}
}

// merge combines per-question outcomes: any records make it a success, NODATA
// beats NXDOMAIN (the name exists). The TTL is that of the records once there
// are any: a negative answer for the other family does not shorten it (nor
// make a cache's countdown out of a lookup that asked one family more).
func (res *Result) merge(o Outcome, ttl time.Duration) {
	switch {
	case o == OutcomeSuccess && res.Outcome != OutcomeSuccess:
		res.Outcome, res.TTL = OutcomeSuccess, ttl
		return
	case o != OutcomeSuccess && res.Outcome == OutcomeSuccess:
		return
	case o == OutcomeNoData && res.Outcome == OutcomeNXDomain:
		res.Outcome = OutcomeNoData
	}
	res.TTL = minTTL(res.TTL, ttl)
}

func minTTL(a, b time.Duration) time.Duration {
	if a == 0 || (b != 0 && b < a) {
		return b
	}
	return a
}

// noteMalformed records, for a reply of m that gave no records for name,
// whether that is because the answer is broken rather than empty: a CNAME
// chain longer than MaxCNAMEs, a CNAME loop, or records of the type asked
// that all belong to other names. A real NODATA has none of these.
func (res *Result) noteMalformed(m *dns.Msg, name string, qtype uint16, o Outcome) {
	if o != OutcomeNoData || m.Rcode != dns.RcodeSuccess {
		return
	}
	if _, err := cnameChain(m, name); err != nil {
		res.malformed = err
		return
	}
	own := owners(m, name)
	for _, rr := range m.Answer {
		if rr.Header().Rrtype == qtype && !own[strings.ToLower(rr.Header().Name)] {
			res.malformed = fmt.Errorf("the answer holds %s records only for other names (such as %s), none for %s",
				dns.TypeToString[qtype], strings.TrimSuffix(rr.Header().Name, "."), strings.TrimSuffix(name, "."))
			return
		}
	}
}

// owners follows the CNAME chain for name inside the answer section and
// returns every name whose records belong to the question (lowercased).
func owners(m *dns.Msg, name string) map[string]bool {
	own, _ := cnameChain(m, name)
	return own
}

// cnameChain follows the CNAMEs from name inside the answer section, at most
// MaxCNAMEs of them; the error says if the chain loops or goes on.
func cnameChain(m *dns.Msg, name string) (map[string]bool, error) {
	own := map[string]bool{strings.ToLower(name): true}
	cur := strings.ToLower(name)
	for i := 0; ; i++ {
		next := ""
		for _, rr := range m.Answer {
			if c, ok := rr.(*dns.CNAME); ok && strings.EqualFold(c.Hdr.Name, cur) {
				next = strings.ToLower(c.Target)
				break
			}
		}
		switch {
		case next == "":
			return own, nil
		case own[next]:
			return own, fmt.Errorf("CNAME loop: %s points back to %s", strings.TrimSuffix(cur, "."), strings.TrimSuffix(next, "."))
		case i == MaxCNAMEs:
			return own, fmt.Errorf("CNAME chain from %s longer than %d", strings.TrimSuffix(name, "."), MaxCNAMEs)
		}
		own[next] = true
		cur = next
	}
}

// addresses takes the A or AAAA records for name (following CNAMEs) from an
// answer. Records for other names are ignored.
func addresses(m *dns.Msg, name string, qtype uint16, dropped *int) ([]netip.Addr, time.Duration, Outcome) {
	return records(m, name, maxCandidates, dropped, func(rr dns.RR) (netip.Addr, bool) {
		if rr.Header().Rrtype != qtype {
			return netip.Addr{}, false
		}
		return rrAddr(rr)
	})
}

// srvRecords takes the SRV records for qname (following CNAMEs) from an answer.
func srvRecords(m *dns.Msg, qname string, dropped *int) ([]*dns.SRV, time.Duration, Outcome) {
	return records(m, qname, MaxEndpoints, dropped, func(rr dns.RR) (*dns.SRV, bool) {
		srv, ok := rr.(*dns.SRV)
		return srv, ok && srv.Target != "."
	})
}

// records takes what take accepts of the answer records owned by name
// (following CNAMEs), at most limit of them (the rest counted in dropped),
// with their smallest TTL; NXDOMAIN and NODATA with the negative TTL.
func records[T any](m *dns.Msg, name string, limit int, dropped *int, take func(dns.RR) (T, bool)) ([]T, time.Duration, Outcome) {
	if m.Rcode == dns.RcodeNameError {
		return nil, negativeTTL(m), OutcomeNXDomain
	}
	own := owners(m, name)
	var out []T
	var ttl time.Duration
	for _, rr := range m.Answer {
		h := rr.Header()
		if !own[strings.ToLower(h.Name)] {
			continue
		}
		v, ok := take(rr)
		if !ok {
			continue
		}
		if len(out) >= limit {
			*dropped++
			continue
		}
		out = append(out, v)
		ttl = minTTL(ttl, ttlOf(h))
	}
	if len(out) == 0 {
		return nil, negativeTTL(m), OutcomeNoData
	}
	return out, ttl, OutcomeSuccess
}

// glueAddresses maps each SRV target to its addresses found in the additional
// section, for the wanted record types. Targets without glue are absent.
func glueAddresses(m *dns.Msg, srvs []*dns.SRV, types []uint16) map[string][]netip.Addr {
	targets := make(map[string]bool, len(srvs))
	for _, s := range srvs {
		targets[strings.ToLower(s.Target)] = true
	}
	glue := make(map[string][]netip.Addr, len(srvs))
	for _, rr := range m.Extra {
		h := rr.Header()
		name := strings.ToLower(h.Name)
		if !targets[name] || !slices.Contains(types, h.Rrtype) {
			continue
		}
		if ip, ok := rrAddr(rr); ok && len(glue[name]) < maxCandidates {
			glue[name] = append(glue[name], ip)
		}
	}
	// A target with glue of an unwanted family only (say AAAA when asking for
	// IPv4) has no usable address: record it as resolved-to-nothing rather than
	// looking it up again.
	for _, rr := range m.Extra {
		name := strings.ToLower(rr.Header().Name)
		if t := rr.Header().Rrtype; targets[name] && (t == dns.TypeA || t == dns.TypeAAAA) {
			if _, ok := glue[name]; !ok {
				glue[name] = nil
			}
		}
	}
	return glue
}

// rrAddr is the address of an A or AAAA record, whatever it is: unusable
// ones are refused (and counted) with the others, by Result.admit.
func rrAddr(rr dns.RR) (netip.Addr, bool) {
	var ip net.IP
	switch rr := rr.(type) {
	case *dns.A:
		ip = rr.A.To4()
	case *dns.AAAA:
		ip = rr.AAAA.To16() // an IPv4-mapped address stays IPv6, to be refused
	}
	a, ok := netip.AddrFromSlice(ip)
	return a, ok && a.IsValid()
}

func ttlOf(h *dns.RR_Header) time.Duration { return ttlDuration(h.Ttl) }

// ttlDuration is how long a TTL lets an answer stand. TTL 0 means "do not
// cache": re-check at the minimum. So do TTLs with the top bit set, which RFC
// 2181 §8 says to treat as 0 (a server sending them is broken, not generous).
func ttlDuration(ttl uint32) time.Duration {
	if ttl == 0 || ttl >= 1<<31 {
		return time.Second
	}
	return time.Duration(ttl) * time.Second
}

// negativeTTL is the NXDOMAIN/NODATA caching time of RFC 2308: min(SOA TTL, SOA MINIMUM).
func negativeTTL(m *dns.Msg) time.Duration {
	for _, rr := range m.Ns {
		if soa, ok := rr.(*dns.SOA); ok {
			return min(ttlDuration(soa.Hdr.Ttl), ttlDuration(soa.Minttl))
		}
	}
	return 0
}

// finish sorts, deduplicates, bounds and fills in Dial.
func finish(eps []Endpoint, dropped *int) []Endpoint {
	slices.SortFunc(eps, func(a, b Endpoint) int {
		if c := a.IP.Compare(b.IP); c != 0 {
			return c
		}
		if a.Port != b.Port {
			return int(a.Port) - int(b.Port)
		}
		return strings.Compare(a.Target, b.Target)
	})
	eps = slices.CompactFunc(eps, func(a, b Endpoint) bool { return a.IP == b.IP && a.Port == b.Port })
	if len(eps) > MaxEndpoints {
		*dropped += len(eps) - MaxEndpoints
		eps = eps[:MaxEndpoints:MaxEndpoints]
	}
	for i := range eps {
		eps[i].Dial = net.JoinHostPort(eps[i].IP.String(), strconv.Itoa(int(eps[i].Port)))
	}
	return slices.Clip(eps)
}
