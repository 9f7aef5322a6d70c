package discovery

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
)

// Floors on the intervals and timeouts. Below them a Config cannot work, or
// works only by hammering something: refresh 1ns made one Service ask DNS
// 2,000 times a second, health_interval 1ns opened 1,600 connections a
// second, dial_timeout 1ns failed every lookup.
const (
	// MinRefresh is the shortest re-check interval (and so the shortest wait
	// after an error). Cluster DNS shows a change within tens of milliseconds;
	// checking more often than 10 times a second buys nothing.
	MinRefresh = 100 * time.Millisecond
	// MinDialTimeout is the shortest time a DNS server is given to answer:
	// a round trip inside a cluster takes about a millisecond, across a
	// congested node tens of them.
	MinDialTimeout = 100 * time.Millisecond
	// MinHealthInterval is the shortest interval between two probes of one
	// endpoint: Kubernetes' own probes run at most once a second
	// (periodSeconds >= 1), and each probe here is a new connection.
	MinHealthInterval = time.Second
	// MinHealthTimeout is the shortest time one probe may take.
	MinHealthTimeout = 10 * time.Millisecond
	// MaxHealthInFlight caps the probes of one Service running at once.
	MaxHealthInFlight = 10000
	// MaxHealthPasses caps the consecutive results that change a state.
	MaxHealthPasses = 1000
)

// Validate reports what makes c unable to work, naming the option as the
// user writes it (refresh_min, dial_timeout, health_interval, …). It checks
// c with its defaults filled in; Start does not call it (tests may run
// faster than a user may), the configuration layer must.
//
// It is the one owner of the rules on a Config's values: the configuration
// layers (Caddy's JSON, the Caddyfile) only turn what the user wrote into a
// Config, and report this error where the user wrote the value.
func (c Config) Validate() error {
	health := c.Health // before the defaults, which replace what is not positive
	c = c.WithDefaults()
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	switch {
	case !c.IPv4 && !c.IPv6:
		bad("versions: enable ipv4, ipv6 or both")
	}
	switch {
	case c.RefreshMin < MinRefresh:
		bad("refresh_min %s is below the minimum of %s", c.RefreshMin, MinRefresh)
	case c.RefreshMax < c.RefreshMin:
		bad("refresh_max %s is below refresh_min %s", c.RefreshMax, c.RefreshMin)
	}
	if c.Stale < 0 {
		bad("stale %s must not be negative", c.Stale)
	}
	if r := c.Resolver; r.Timeout < MinDialTimeout {
		bad("dial_timeout %s is below the minimum of %s", r.Timeout, MinDialTimeout)
	}
	if r := c.Resolver; r.UDPSize < 512 || r.UDPSize > 65535 {
		bad("edns_buffer_size must be in 512-65535, got %d", r.UDPSize)
	}
	for _, s := range c.Resolver.Servers {
		if _, err := NormalizeServer(s); err != nil {
			bad("resolvers: %v", err)
		}
	}
	for _, p := range c.Addresses.CIDRs {
		if !p.IsValid() {
			bad("allow_cidrs: %s is not a valid CIDR", p)
		}
	}
	if a := c.API; a != nil {
		if _, _, _, err := KubeName(c.Service); err != nil {
			errs = append(errs, err)
		}
		if u, err := url.Parse(a.Endpoint); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || (u.Path != "" && u.Path != "/") {
			bad("via api: endpoint %q: want https://host:port", a.Endpoint)
		}
	}
	if health != nil {
		if err := health.validate(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// validate checks a HealthCheck with its defaults filled in.
func (c HealthCheck) validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf("health_checks: "+format, args...)) }
	// Before the defaults, which replace what is not positive.
	if c.Interval < 0 || c.Jitter < 0 || c.Timeout < 0 {
		bad("interval, jitter and timeout must not be negative")
	}
	if c.Passes < 0 || c.Fails < 0 || c.MaxInFlight < 0 {
		bad("passes, fails and max_in_flight must not be negative")
	}
	c = c.withDefaults()
	if c.Interval < MinHealthInterval {
		bad("interval %s is below the minimum of %s", c.Interval, MinHealthInterval)
	}
	if c.Timeout < MinHealthTimeout {
		bad("timeout %s is below the minimum of %s", c.Timeout, MinHealthTimeout)
	}
	if c.MaxInFlight > MaxHealthInFlight {
		bad("max_in_flight %d is above the maximum of %d", c.MaxInFlight, MaxHealthInFlight)
	}
	if c.Passes > MaxHealthPasses || c.Fails > MaxHealthPasses {
		bad("passes %d and fails %d must be at most %d", c.Passes, c.Fails, MaxHealthPasses)
	}
	if c.Status != 0 && !(c.Status >= 1 && c.Status <= 5 || c.Status >= 100 && c.Status <= 599) {
		bad("expect_status %d: use a code (100-599) or a class digit (2 means 2xx)", c.Status)
	}
	if c.TCP {
		return errors.Join(errs...)
	}
	if err := c.TLS.check(); err != nil {
		bad("tls: root CAs: %w", err)
	}
	// What http.NewRequest and the transport would refuse on every probe.
	if c.Method == "" || strings.IndexFunc(c.Method, func(r rune) bool { return r > 0x7f || !httpguts.IsTokenRune(r) }) >= 0 {
		bad("method %q is not an HTTP method (a token: letters, no spaces)", c.Method)
	}
	if !strings.HasPrefix(c.URI, "/") {
		bad("uri %q must start with /", c.URI)
	} else if _, err := url.ParseRequestURI(c.URI); err != nil || strings.ContainsAny(c.URI, " \t\r\n#") {
		bad("uri %q is not a valid request path and query (escape it: %%20 for a space, %%25 for %%)", c.URI)
	}
	for k, vs := range c.Headers {
		if !httpguts.ValidHeaderFieldName(k) {
			bad("headers: %q is not a valid header name", k)
		}
		for _, v := range vs {
			if !httpguts.ValidHeaderFieldValue(v) {
				bad("headers: the value of %s holds a control character (CR, LF or NUL): %q", k, v)
			}
		}
	}
	return errors.Join(errs...)
}
