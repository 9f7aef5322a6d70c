package caddymodule

import (
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-headless/caddy-headless/caddymodule/discovery"
)

// UnmarshalCaddyfile sets up the source from Caddyfile tokens. Syntax:
//
//	dynamic headless <service>:<port> {
//	    resolvers        <host[:port]>...
//	    namespace        <namespace>
//	    cluster_domain   <domain>
//	    refresh          <min> [<max>]
//	    stale            <duration>
//	    versions         ipv4|ipv6 ...
//	    dial_timeout     <duration>
//	    edns_buffer_size <bytes>
//	}
func (h *Headless) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the source name
	if !d.NextArg() {
		return d.Errf("headless: missing service reference (e.g. backend.bbs:http or frontend.bbs:8001)")
	}
	if err := h.setService(d); err != nil {
		return err
	}
	if d.NextArg() {
		return d.Errf("headless: one service per source, got extra argument %q (use dynamic multi to combine services)", d.Val())
	}
	for d.NextBlock(0) {
		known, err := h.UnmarshalOption(d)
		if err != nil {
			return err
		}
		if !known {
			return d.Errf("headless: unknown option %q", d.Val())
		}
	}
	return nil
}

// setService takes the current token as the service reference, checking its
// syntax now so the error points at the Caddyfile line.
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

// UnmarshalOption parses one option at the cursor (the option name is the
// current token). It reports false, without consuming anything, if the token is
// not one of this source's options; the headless_proxy directive uses this to
// mix these options with reverse_proxy's own.
func (h *Headless) UnmarshalOption(d *caddyfile.Dispenser) (bool, error) {
	switch d.Val() {
	case "resolvers":
		h.Resolvers = d.RemainingArgs()
		if len(h.Resolvers) == 0 {
			return true, d.ArgErr()
		}
		for _, r := range h.Resolvers {
			if _, err := discovery.NormalizeServer(r); err != nil {
				return true, d.Errf("headless: %v", err)
			}
		}
	case "namespace":
		if !d.AllArgs(&h.Namespace) {
			return true, d.ArgErr()
		}
		if err := checkLabel("namespace", h.Namespace); err != nil {
			return true, d.Errf("%v", err)
		}
	case "cluster_domain":
		if !d.AllArgs(&h.ClusterDomain) {
			return true, d.ArgErr()
		}
		if _, err := discovery.ParseService("x:1", discovery.Defaults{ClusterDomain: h.ClusterDomain}); err != nil {
			return true, d.Errf("headless: cluster_domain %q is not a valid DNS name", h.ClusterDomain)
		}
	case "refresh":
		args := d.RemainingArgs()
		if len(args) < 1 || len(args) > 2 {
			return true, d.Errf("headless: refresh takes <min> [<max>]")
		}
		lo, err := parseDuration(d, "refresh", args[0])
		if err != nil {
			return true, err
		}
		hi := lo
		if len(args) == 2 {
			if hi, err = parseDuration(d, "refresh", args[1]); err != nil {
				return true, err
			}
		}
		if lo <= 0 || hi < lo {
			return true, d.Errf("headless: refresh: need 0 < min <= max, got %s %s", time.Duration(lo), time.Duration(hi))
		}
		h.RefreshMin, h.RefreshMax = lo, hi
	case "stale":
		var err error
		if !d.NextArg() {
			return true, d.ArgErr()
		}
		if h.Stale, err = parseDuration(d, "stale", d.Val()); err != nil {
			return true, err
		}
		if d.NextArg() {
			return true, d.ArgErr()
		}
	case "dial_timeout":
		var err error
		if !d.NextArg() {
			return true, d.ArgErr()
		}
		if h.DialTimeout, err = parseDuration(d, "dial_timeout", d.Val()); err != nil {
			return true, err
		}
		if h.DialTimeout <= 0 || d.NextArg() {
			return true, d.Errf("headless: dial_timeout takes one positive duration")
		}
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
	case "edns_buffer_size":
		if !d.NextArg() {
			return true, d.ArgErr()
		}
		n, err := strconv.Atoi(d.Val())
		if err != nil || n < 512 || n > 65535 || d.NextArg() {
			return true, d.Errf("headless: edns_buffer_size takes one number in 512-65535, got %q", d.Val())
		}
		h.EDNSBufferSize = n
	default:
		return false, nil
	}
	return true, nil
}

func parseDuration(d *caddyfile.Dispenser, field, s string) (caddy.Duration, error) {
	dur, err := caddy.ParseDuration(s)
	if err != nil {
		return 0, d.Errf("headless: %s: bad duration %q: %v", field, s, err)
	}
	if dur < 0 {
		return 0, d.Errf("headless: %s: duration %q must not be negative", field, s)
	}
	return caddy.Duration(dur), nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Headless)(nil)
