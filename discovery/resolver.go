package discovery

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
)

// Outcome classifies how one DNS question ended.
type Outcome string

// The outcomes of a lookup; metrics and logs use these names.
const (
	OutcomeSuccess   Outcome = "success"       // records for the question
	OutcomeNXDomain  Outcome = "nxdomain"      // the name does not exist: no ready endpoints
	OutcomeNoData    Outcome = "nodata"        // the name exists, no records of this type
	OutcomeServFail  Outcome = "servfail"      // SERVFAIL, e.g. CoreDNS not synced yet
	OutcomeRefused   Outcome = "refused"       // REFUSED
	OutcomeTimeout   Outcome = "timeout"       // no reply in time
	OutcomeNetwork   Outcome = "network_error" // connection refused, reset, closed mid-message
	OutcomeBadAnswer Outcome = "bad_answer"    // malformed, wrong question, other rcodes, TC over TCP
)

// AllOutcomes lists every Outcome, for callers that pre-create counters;
// a copy, so no caller can change what the package counts by.
func AllOutcomes() []Outcome { return slices.Clone(outcomes) }

var outcomes = []Outcome{OutcomeSuccess, OutcomeNXDomain, OutcomeNoData, OutcomeServFail,
	OutcomeRefused, OutcomeTimeout, OutcomeNetwork, OutcomeBadAnswer}

// LookupError is a failed question: which name, which server, what happened.
type LookupError struct {
	Name    string // the name asked
	Type    uint16 // the record type asked
	Server  string // the DNS server that failed last
	Outcome Outcome
	Err     error
}

func (e *LookupError) Error() string {
	return fmt.Sprintf("DNS server %s: %s %s: %s: %v", e.Server, strings.TrimSuffix(e.Name, "."),
		dns.TypeToString[e.Type], e.Outcome, e.Err)
}

func (e *LookupError) Unwrap() error { return e.Err }

// Resolver asks DNS questions of a list of servers, failing over between them.
type Resolver struct {
	// Servers are host:port addresses, tried in turn starting with the one that
	// answered last.
	Servers []string
	// Timeout bounds each attempt at one server. Default 2s.
	Timeout time.Duration
	// UDPSize is the EDNS0 buffer size advertised over UDP, 512-65535
	// (Config.Validate checks it). Default 1232.
	UDPSize int

	preferred atomic.Uint32 // index into Servers of the last server that answered
}

// Reply is a DNS answer with how it was obtained.
type Reply struct {
	Msg       *dns.Msg
	Server    string
	Truncated bool // the UDP reply was truncated, so the question was asked again over TCP
	// Partial: even the TCP reply was truncated (more than 64 KiB of records): the
	// server left some records out, additional ones first.
	Partial bool
}

// DefaultTimeout and DefaultUDPSize are used when a Resolver leaves them zero.
const (
	DefaultTimeout = 2 * time.Second
	DefaultUDPSize = 1232
)

// Exchange asks for name/qtype. It returns the reply of the first server that
// gives a definite answer (NOERROR or NXDOMAIN); SERVFAIL, REFUSED, timeouts,
// network errors and malformed replies move on to the next server. The error,
// if every server failed, is a *LookupError for the last one.
func (r *Resolver) Exchange(ctx context.Context, name string, qtype uint16) (Reply, error) {
	if len(r.Servers) == 0 {
		return Reply{}, &LookupError{Name: name, Type: qtype, Server: "(none)", Outcome: OutcomeNetwork,
			Err: errors.New("no DNS servers configured")}
	}
	q := new(dns.Msg)
	q.SetQuestion(name, qtype)
	q.RecursionDesired = true
	size := r.UDPSize
	if size <= 0 {
		size = DefaultUDPSize
	}
	q.SetEdns0(uint16(min(size, 65535)), false)

	var lastErr error
	start := int(r.preferred.Load())
	for i := range r.Servers {
		idx := (start + i) % len(r.Servers)
		server := r.Servers[idx]
		reply, err := r.ask(ctx, q, server)
		if err == nil {
			r.preferred.Store(uint32(idx))
			return reply, nil
		}
		lastErr = err
		if ctx.Err() != nil {
			break
		}
	}
	return Reply{}, lastErr
}

// ask sends q to one server: UDP first, TCP when the UDP reply is truncated.
func (r *Resolver) ask(ctx context.Context, q *dns.Msg, server string) (Reply, error) {
	timeout := r.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	fail := func(o Outcome, err error) (Reply, error) {
		return Reply{}, &LookupError{Name: q.Question[0].Name, Type: q.Question[0].Qtype, Server: server, Outcome: o, Err: err}
	}
	actx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	udp := &dns.Client{Net: "udp", UDPSize: q.IsEdns0().UDPSize(), Timeout: timeout}
	m, err := exchange(actx, udp, q, server)
	reply := Reply{Msg: m, Server: server}
	if err == nil && m.Truncated {
		reply.Truncated = true
		m, err = exchange(actx, &dns.Client{Net: "tcp", Timeout: timeout}, q, server)
		reply.Msg = m
		reply.Partial = err == nil && m.Truncated
	}
	if err != nil {
		return fail(classifyNetErr(err), err)
	}
	if err := checkReply(q, m); err != nil {
		return fail(OutcomeBadAnswer, err)
	}
	switch m.Rcode {
	case dns.RcodeSuccess, dns.RcodeNameError:
		if reply.Partial && m.Rcode == dns.RcodeSuccess && len(m.Answer) == 0 {
			// Not NODATA (which would empty the set): the server cut everything.
			return fail(OutcomeBadAnswer, errors.New("reply truncated over TCP with no records in it"))
		}
		return reply, nil
	case dns.RcodeServerFailure:
		return fail(OutcomeServFail, errors.New("server failure (SERVFAIL)"))
	case dns.RcodeRefused:
		return fail(OutcomeRefused, errors.New("query refused (REFUSED)"))
	default:
		return fail(OutcomeBadAnswer, fmt.Errorf("unexpected rcode %s", dns.RcodeToString[m.Rcode]))
	}
}

// exchange is one round trip. Unlike miekg/dns's ExchangeContext it also ends
// when ctx is cancelled (not only at its deadline), so stopping a watcher never
// waits for a DNS server that does not answer.
func exchange(ctx context.Context, c *dns.Client, q *dns.Msg, server string) (*dns.Msg, error) {
	conn, err := c.DialContext(ctx, server)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	m, _, err := c.ExchangeWithConnContext(ctx, q, conn)
	if err != nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	return m, err
}

// checkReply rejects replies that do not answer our question.
func checkReply(q, m *dns.Msg) error {
	if !m.Response {
		return errors.New("reply is not a response (QR bit clear)")
	}
	if len(m.Question) != 1 {
		return fmt.Errorf("reply has %d questions, want 1", len(m.Question))
	}
	got, want := m.Question[0], q.Question[0]
	if !strings.EqualFold(got.Name, want.Name) || got.Qtype != want.Qtype || got.Qclass != want.Qclass {
		return fmt.Errorf("reply is for %s %s, not the question asked", got.Name, dns.TypeToString[got.Qtype])
	}
	return nil
}

func classifyNetErr(err error) Outcome {
	var ne net.Error
	if errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout() {
		return OutcomeTimeout
	}
	if errors.Is(err, dns.ErrId) || errors.Is(err, dns.ErrShortRead) || strings.Contains(err.Error(), "dns:") {
		// miekg/dns unpack errors all start with "dns: ".
		return OutcomeBadAnswer
	}
	return OutcomeNetwork
}

// NormalizeServer turns "host" or "host:port" (IPv6 in brackets, or bare) into
// host:port with port 53 by default.
func NormalizeServer(s string) (string, error) {
	if s == "" {
		return "", errors.New("empty resolver address")
	}
	// A bare address, with a zone or not ("fe80::1%eth0"), or one in brackets.
	bare := s
	if strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]") {
		bare = s[1 : len(s)-1]
	}
	if ip, err := netip.ParseAddr(bare); err == nil {
		// "::1:53" is an address, but most likely meant as ::1 port 53:
		// refuse what reads both ways.
		if i := strings.LastIndexByte(bare, ':'); bare == s && ip.Is6() && i > 0 {
			if _, perr := netip.ParseAddr(bare[:i]); perr == nil && isPort(bare[i+1:]) {
				return "", fmt.Errorf("resolver %q is ambiguous: write [%s]:%s for port %s of %s, or [%s] for the address %s",
					s, bare[:i], bare[i+1:], bare[i+1:], bare[:i], bare, bare)
			}
		}
		return joinHostPort(ip.String(), "53"), nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		if strings.Contains(s, ":") {
			return "", fmt.Errorf("resolver %q: %v (write IPv6 with a port as [::1]:53)", s, err)
		}
		host, port = s, "53"
	}
	if host == "" {
		return "", fmt.Errorf("resolver %q: missing host", s)
	}
	if _, err := netip.ParseAddr(host); err != nil {
		if err := checkName(strings.ToLower(strings.TrimSuffix(host, ".")) + "."); err != nil {
			return "", fmt.Errorf("resolver %q: host %q is neither an IP address nor a host name", s, host)
		}
	}
	if !isPort(port) {
		return "", fmt.Errorf("resolver %q: port %q is not a number in 1-65535", s, port)
	}
	return joinHostPort(host, port), nil
}

// isPort reports whether s is a port number, 1-65535, written plainly.
func isPort(s string) bool {
	var p int
	_, err := fmt.Sscanf(s, "%d", &p)
	return err == nil && p >= 1 && p <= 65535 && fmt.Sprint(p) == s
}

func joinHostPort(host, port string) string { return net.JoinHostPort(host, port) }
