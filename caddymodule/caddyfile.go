package caddymodule

import (
	"net/http"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-headless/caddy-headless/discovery"
)

// UnmarshalCaddyfile sets up the source from Caddyfile tokens. Syntax:
//
//	dynamic headless <service>:<port>... {
//	    resolvers        <host[:port]>...
//	    namespace        <namespace>
//	    cluster_domain   <domain>
//	    refresh          <min> [<max>]
//	    stale            <duration>
//	    versions         ipv4|ipv6 ...
//	    dial_timeout     <duration>
//	    edns_buffer_size <bytes>
//	    allow_addresses  loopback|link_local ...
//	    allow_cidrs      <cidr>...
//	    candidates       <n>|all
//	    weights          <weight>...   (one per Service, in order; 0 = backup)
//	    via              dns|api [{ endpoint <url>; ca_file <pem>; token_file <file> }]
//
//	    # active health checks (any health_* option turns them on)
//	    health_uri       <uri>
//	    health_mode      http|tcp
//	    health_port      <port>
//	    health_method    <method>
//	    health_headers   { <field> [<values...>] }
//	    health_interval  <duration>
//	    health_jitter    <duration>
//	    health_timeout   <duration>
//	    health_passes    <n>
//	    health_fails     <n>
//	    health_status    <code>|<class, e.g. 2xx>
//	    health_body      <regexp>
//	    health_max_in_flight <n>
//	    health_optimistic
//	    health_fail_fast
//	    health_tls
//	    health_tls_server_name <name>
//	    health_tls_insecure_skip_verify
//	    health_tls_ca    <pem file>
//	    slow_start       <duration>
//	}
//
// Several Services make one source that splits requests between them (see
// WeightedService).
func (h *Headless) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the source name
	if !d.NextArg() {
		return d.Errf("headless: missing service reference (e.g. backend.bbs:http or frontend.bbs:8001)")
	}
	if err := h.setService(d); err != nil {
		return err
	}
	for d.NextArg() { // several Services: a split (split.go)
		if err := h.addService(d); err != nil {
			return err
		}
	}
	opts := newOptionParser(h)
	for d.NextBlock(0) {
		known, err := opts.option(d)
		if err != nil {
			return err
		}
		if !known {
			return d.Errf("headless: unknown option %q", d.Val())
		}
	}
	if _, err := h.configs(caddyfileEnv); err != nil {
		return opts.errAt(d, err)
	}
	return nil
}

// listOptions may be given more than once: their values add up. Every other
// option may be given once: a second `refresh` silently replacing the first
// is a mistake waiting to be made.
var listOptions = map[string]bool{
	"resolvers": true, "allow_addresses": true, "allow_cidrs": true, "health_headers": true,
}

// optionParser parses a block of options into one Headless. It refuses a
// repeated single-value option, and remembers where each option was and
// whether the configuration was valid right after it, so that a value error
// found once the block is complete (the rules of config, applied to the
// whole) points at the option's own line, not at the block's closing brace.
type optionParser struct {
	h    *Headless
	seen map[string]bool
	at   []optionAt
}

type optionAt struct {
	tok caddyfile.Token // the option's name
	bad bool            // the configuration was invalid right after it
}

func newOptionParser(h *Headless) *optionParser {
	return &optionParser{h: h, seen: map[string]bool{}}
}

// option parses one option at the cursor, as Headless.unmarshalOption.
func (p *optionParser) option(d *caddyfile.Dispenser) (bool, error) {
	opt, tok := d.Val(), d.Token()
	if p.seen[opt] && !listOptions[opt] {
		return true, d.Errf("headless: %s is given twice: give it once (only resolvers, allow_addresses, allow_cidrs and health_headers add up)", opt)
	}
	known, err := p.h.unmarshalOption(d)
	if !known || err != nil {
		return known, err
	}
	p.seen[opt] = true
	check := *p.h
	if check.Service == "" { // headless_proxy names its services apart
		check.Service = "placeholder:1"
	}
	_, cerr := check.config(caddyfileEnv)
	p.at = append(p.at, optionAt{tok: tok, bad: cerr != nil})
	return true, nil
}

// errAt reports err, found when the block was complete, at the option after
// which the configuration stayed invalid; at d if there is none (the error
// is not about an option's value).
func (p *optionParser) errAt(d *caddyfile.Dispenser, err error) error {
	k := len(p.at)
	for k > 0 && p.at[k-1].bad {
		k--
	}
	if k == len(p.at) {
		return d.WrapErr(err)
	}
	at := caddyfile.NewDispenser([]caddyfile.Token{p.at[k].tok})
	at.Next()
	return at.WrapErr(err)
}

// caddyfileEnv stands in for the pod's environment when a Caddyfile is
// checked: the defaults only complete names, so any will do.
var caddyfileEnv = discovery.Detected{
	Defaults:  discovery.Defaults{Namespace: "default", ClusterDomain: "cluster.local"},
	Resolvers: []string{"127.0.0.1:53"},
	APIServer: "https://127.0.0.1:6443",
}

// setService takes the current token as the service reference.
func (h *Headless) setService(d *caddyfile.Dispenser) error {
	if h.Service != "" {
		return d.Errf("headless: service already set to %q", h.Service)
	}
	if _, err := discovery.ParseService(d.Val(), discovery.Defaults{}); err != nil {
		return d.Errf("headless: %v", err)
	}
	h.Service = d.Val()
	return nil
}

// unmarshalOption parses one option at the cursor (the option name is the
// current token). It only turns tokens into values: it checks their form
// and count, and refuses a 0 that would read as "left out" (refresh,
// positive durations, candidates); every rule on the values themselves is
// config's and the core's, reported at the option's line by optionParser. It reports false, without consuming anything, if the token is
// not one of this source's options; the headless_proxy directive uses this to
// mix these options with reverse_proxy's own.
func (h *Headless) unmarshalOption(d *caddyfile.Dispenser) (bool, error) {
	var err error
	switch d.Val() {
	// The list options add up when repeated.
	case "resolvers":
		args := d.RemainingArgs()
		if len(args) == 0 {
			return true, d.Errf("headless: resolvers takes one or more <host[:port]>")
		}
		h.Resolvers = append(h.Resolvers, args...)
	case "allow_addresses":
		args := d.RemainingArgs()
		if len(args) == 0 {
			return true, d.Errf("headless: allow_addresses takes loopback, link_local or both")
		}
		h.AllowAddresses = append(h.AllowAddresses, args...)
	case "allow_cidrs":
		args := d.RemainingArgs()
		if len(args) == 0 {
			return true, d.Errf("headless: allow_cidrs takes one or more CIDRs, e.g. 10.0.0.0/8")
		}
		h.AllowCIDRs = append(h.AllowCIDRs, args...)
	case "namespace":
		if !d.AllArgs(&h.Namespace) {
			return true, d.ArgErr()
		}
	case "cluster_domain":
		if !d.AllArgs(&h.ClusterDomain) {
			return true, d.ArgErr()
		}
	case "refresh":
		args := d.RemainingArgs()
		if len(args) < 1 || len(args) > 2 {
			return true, d.Errf("headless: refresh takes <min> [<max>]")
		}
		var lo, hi caddy.Duration
		if lo, err = parseDuration(d, "refresh", args[0]); err != nil {
			return true, err
		}
		hi = lo
		if len(args) == 2 {
			if hi, err = parseDuration(d, "refresh", args[1]); err != nil {
				return true, err
			}
			if hi == 0 {
				return true, d.Errf("headless: refresh <max> must be positive; leave it out for max = min")
			}
		}
		if lo == 0 {
			return true, d.Errf("headless: refresh must be positive")
		}
		h.RefreshMin, h.RefreshMax = lo, hi
	case "stale":
		h.Stale, err = durationArg(d, false)
	case "dial_timeout":
		h.DialTimeout, err = durationArg(d, true)
	case "versions":
		args := d.RemainingArgs()
		if len(args) == 0 {
			return true, d.Errf("headless: versions takes ipv4, ipv6 or both")
		}
		v, yes := &reverseproxy.IPVersions{}, true
		for _, a := range args {
			switch a {
			case "ipv4":
				v.IPv4 = &yes
			case "ipv6":
				v.IPv6 = &yes
			default:
				return true, d.Errf("headless: versions: unknown IP version %q (want ipv4 or ipv6)", a)
			}
		}
		h.Versions = v
	case "slow_start":
		h.SlowStart, err = durationArg(d, true)
	case "edns_buffer_size":
		h.EDNSBufferSize, err = numberArg(d)
	case "weights":
		err = h.unmarshalWeights(d)
	case "via":
		return true, h.unmarshalVia(d)
	case "candidates":
		if args := d.RemainingArgs(); len(args) == 1 && args[0] == "all" {
			h.Candidates = -1
		} else if len(args) != 1 {
			return true, d.ArgErr()
		} else if h.Candidates, err = strconv.Atoi(args[0]); err != nil || h.Candidates < 1 {
			return true, d.Errf("headless: candidates takes a count (at least 1) or all, got %q", args[0])
		}
	default:
		if strings.HasPrefix(d.Val(), "health_") {
			return h.unmarshalHealth(d)
		}
		return false, nil
	}
	return true, err
}

// unmarshalHealth parses one health_* option.
func (h *Headless) unmarshalHealth(d *caddyfile.Dispenser) (bool, error) {
	opt := d.Val()
	fresh := h.HealthChecks == nil
	if fresh {
		h.HealthChecks = new(HealthChecks)
	}
	hc := h.HealthChecks
	one := func() (string, error) { return oneArg(d) }
	none := func() error {
		if d.NextArg() {
			return d.Errf("headless: %s takes no argument, got %q", opt, d.Val())
		}
		return nil
	}
	number := func() (int, error) { return numberArg(d) }
	duration := func() (caddy.Duration, error) { return durationArg(d, true) }
	tlsConf := func() *HealthTLS {
		if hc.TLS == nil {
			hc.TLS = new(HealthTLS)
		}
		return hc.TLS
	}
	var err error
	switch opt {
	case "health_uri":
		hc.URI, err = one()
	case "health_mode":
		hc.Mode, err = one()
	case "health_port":
		hc.Port, err = number()
	case "health_method":
		hc.Method, err = one()
	case "health_headers":
		if err = none(); err != nil {
			return true, err
		}
		for nesting := d.Nesting(); d.NextBlock(nesting); {
			if hc.Headers == nil {
				hc.Headers = http.Header{} // only when non-empty: JSON omits an empty one
			}
			field := d.Val()
			hc.Headers[field] = append(hc.Headers[field], d.RemainingArgs()...)
		}
	case "health_interval":
		hc.Interval, err = duration()
	case "health_jitter":
		hc.Jitter, err = duration()
	case "health_timeout":
		hc.Timeout, err = duration()
	case "health_passes":
		hc.Passes, err = number()
	case "health_fails":
		hc.Fails, err = number()
	case "health_max_in_flight":
		hc.MaxInFlight, err = number()
	case "health_status":
		var v string
		if v, err = one(); err != nil {
			break
		}
		// The form only: a class is written Nxx and becomes the digit N
		// (expect_status's class form), a code is three digits. Which
		// codes and classes exist is the core's rule.
		num := v
		if len(v) == 3 && strings.HasSuffix(v, "xx") {
			num = v[:1]
		}
		n, cerr := strconv.Atoi(num)
		if cerr != nil || len(num) != 1 && len(num) != 3 || len(num) == 1 && num == v || strings.ContainsAny(num, "+-") {
			err = d.Errf("headless: health_status %q: use a code (200) or a class (2xx)", v)
		}
		hc.ExpectStatus = n
	case "health_body":
		hc.ExpectBody, err = one()
	case "health_optimistic":
		err, hc.Optimistic = none(), true
	case "health_fail_fast":
		err, hc.FailFast = none(), true
	case "health_tls":
		err = none()
		tlsConf()
	case "health_tls_server_name":
		tlsConf().ServerName, err = one()
	case "health_tls_insecure_skip_verify":
		err = none()
		tlsConf().InsecureSkipVerify = true
	case "health_tls_ca":
		tlsConf().CA, err = one()
	default:
		if fresh {
			h.HealthChecks = nil
		}
		return false, nil
	}
	return true, err
}

// oneArg returns the single argument of the option at the cursor.
func oneArg(d *caddyfile.Dispenser) (string, error) {
	opt := d.Val()
	if !d.NextArg() {
		return "", d.Errf("headless: %s takes one argument", opt)
	}
	v := d.Val()
	if d.NextArg() {
		return "", d.Errf("headless: %s takes one argument, got extra %q", opt, d.Val())
	}
	return v, nil
}

// numberArg returns the option's single argument as a number (whose range
// config checks).
func numberArg(d *caddyfile.Dispenser) (int, error) {
	opt := d.Val()
	v, err := oneArg(d)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0, d.Errf("headless: %s takes a number, got %q", opt, v)
	}
	return n, nil
}

// durationArg returns the option's single argument as a duration, above
// zero if positive is set: written 0, such an option would read as left
// out (its default) in the JSON, so the Caddyfile refuses it. Every other
// rule on the value (negative, floors) is the core's (config).
func durationArg(d *caddyfile.Dispenser, positive bool) (caddy.Duration, error) {
	opt := d.Val()
	v, err := oneArg(d)
	if err != nil {
		return 0, err
	}
	dur, err := parseDuration(d, opt, v)
	if err == nil && positive && dur == 0 {
		err = d.Errf("headless: %s must be positive", opt)
	}
	return dur, err
}

// parseDuration turns a token into a duration; its range is the core's.
func parseDuration(d *caddyfile.Dispenser, field, s string) (caddy.Duration, error) {
	dur, err := caddy.ParseDuration(s)
	if err != nil {
		return 0, d.Errf("headless: %s: bad duration %q: %v", field, s, err)
	}
	return caddy.Duration(dur), nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Headless)(nil)
