package caddymodule

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-headless/caddy-headless/discovery"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("headless_proxy", parseHeadlessProxy)
	// Right after reverse_proxy, as php_fastcgi is: a site needs no route
	// block or order option to use it.
	httpcaddyfile.RegisterDirectiveOrder("headless_proxy", httpcaddyfile.After, "reverse_proxy")
}

// parseHeadlessProxy builds Caddy's own reverse_proxy handler whose upstreams
// are the endpoints of one or more headless Services. Syntax:
//
//	headless_proxy [<matcher>] [http://|https://|h2c://]<service>:<port>... {
//	    # the options of `dynamic headless`, applied to every Service
//	    resolvers        <host[:port]>...
//	    namespace        <namespace>
//	    cluster_domain   <domain>
//	    refresh          <min> [<max>]
//	    stale            <duration>
//	    versions         ipv4|ipv6 ...
//	    dial_timeout     <duration>
//	    edns_buffer_size <bytes>
//	    health_*         ...   (active health checks, see `dynamic headless`)
//	    weights          <weight>...   (one per Service; 0 = backup)
//
//	    # and every reverse_proxy subdirective except `to` and `dynamic`
//	    lb_policy ...
//	    header_up ...
//	    transport http { ... }
//	    ...
//	}
//
// The Services become one `dynamic headless` source; with several, each
// request goes to one of them (by `weights`, one per Service in order, 0 for
// a backup; without weights, every endpoint of every Service gets the same
// share). A scheme works as it does for
// reverse_proxy: `https://` turns on TLS to the upstreams, `h2c://` HTTP/2
// over cleartext; without a port, https:// means 443 and http:// 80.
//
// The reverse_proxy part is parsed by reverse_proxy itself, as php_fastcgi
// does, so its subdirectives, checks and error messages are Caddy's own.
func parseHeadlessProxy(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	// The helper stands before the directive name (the matcher is already
	// taken out); work on a copy of the segment, which is edited below.
	h.Next()
	d := h.NewFromNextSegment()
	d.Next() // the directive name

	refs, scheme, err := serviceRefs(d)
	if err != nil {
		return nil, err
	}
	opts := headlessOf(refs)
	if err := takeSourceOptions(d, &opts); err != nil {
		return nil, err
	}
	rp, err := reverseProxyOf(h, d, scheme, len(refs))
	if err != nil {
		return nil, err
	}
	if hc := opts.HealthChecks; hc != nil && scheme == "https" && hc.Mode != "tcp" && hc.TLS == nil {
		// The upstreams speak HTTPS: so do the probes, verifying the
		// endpoints as the transport does.
		hc.TLS = probeTLSFrom(rp.TransportRaw)
	}
	rp.DynamicUpstreamsRaw = caddyconfig.JSONModuleObject(opts, "source", "headless", nil)
	return rp, nil
}

// serviceRefs reads the arguments of the directive: the service references,
// without their scheme, and that scheme, which all of them must share.
func serviceRefs(d *caddyfile.Dispenser) (refs []string, scheme string, err error) {
	for d.NextArg() {
		ref, sch, err := splitScheme(d)
		if err != nil {
			return nil, "", err
		}
		if len(refs) > 0 && sch != scheme {
			return nil, "", d.Errf("headless_proxy: all services must use the same scheme: %q after %q", schemeOf(sch), schemeOf(scheme))
		}
		if _, err := discovery.ParseService(ref, discovery.Defaults{}); err != nil {
			return nil, "", d.Errf("headless_proxy: %v", err)
		}
		refs, scheme = append(refs, ref), sch
	}
	if len(refs) == 0 {
		return nil, "", d.Errf("headless_proxy: missing service reference (e.g. frontend.bbs:8001 or backend.bbs:http)")
	}
	return refs, scheme, nil
}

// headlessOf is the headless source of refs: one Service, or several that it
// splits the requests between (by the weights option, if given).
func headlessOf(refs []string) Headless {
	if len(refs) == 1 {
		return Headless{Service: refs[0]}
	}
	var opts Headless
	for _, ref := range refs {
		opts.Services = append(opts.Services, WeightedService{Service: ref})
	}
	return opts
}

// takeSourceOptions parses the source's options out of the block at d into
// opts and deletes them from d, leaving reverse_proxy's subdirectives; then
// checks opts as a whole.
func takeSourceOptions(d *caddyfile.Dispenser, opts *Headless) error {
	parser := newOptionParser(opts)
	for d.NextBlock(0) {
		// Only the first token of a line directly inside the block names an
		// option; nested blocks (transport, handle_response, …) and their
		// closing braces belong to reverse_proxy.
		if d.Nesting() != 1 || d.Val() == "}" {
			continue
		}
		if err := takeSourceOption(d, parser); err != nil {
			return err
		}
	}
	if _, err := opts.configs(caddyfileEnv); err != nil {
		return parser.errAt(d, fmt.Errorf("headless_proxy: %v", err))
	}
	return nil
}

// takeSourceOption looks at the line at d: an option of the source is parsed
// and deleted, a subdirective of reverse_proxy is left where it is, and one
// that cannot work on the source's upstreams is an error.
func takeSourceOption(d *caddyfile.Dispenser, parser *optionParser) error {
	opt := d.Val()
	if opt == "to" || opt == "dynamic" {
		return d.Errf("headless_proxy: %q is not allowed here: the upstreams are the services named after headless_proxy (use reverse_proxy for other upstreams, or name more services)", opt)
	}
	// Take the whole line, its block included (health_headers has one), and
	// parse it on its own.
	seg := d.NextSegment()
	sub := caddyfile.NewDispenser(seg)
	sub.Next()
	if opt == "lb_policy" && len(seg) > 1 && seg[1].Text == "weighted_round_robin" {
		return sub.Errf("headless_proxy: %v", errWeightedRoundRobin)
	}
	known, err := parser.option(sub)
	if err != nil {
		return err
	}
	if !known {
		if strings.HasPrefix(opt, "health_") {
			// Caddy runs its own active health checks on static upstreams
			// only: handed to reverse_proxy, this would silently do nothing.
			return sub.Errf("headless_proxy: %s: not an option of the headless source's health checks, and reverse_proxy's own never run on dynamic upstreams (see the README's health checks section)", opt)
		}
		return nil // reverse_proxy's
	}
	if err := leftOver(d, sub, seg); err != nil {
		return err
	}
	d.DeleteN(len(seg))
	return nil
}

// leftOver reports what the option parsed from sub left of its segment seg:
// an argument, or a block it does not take. d is at the segment's end.
func leftOver(d, sub *caddyfile.Dispenser, seg caddyfile.Segment) error {
	opt := seg[0].Text
	if sub.Next() {
		if sub.Val() == "{" {
			return sub.Errf("headless_proxy: %s takes no block", opt)
		}
		return sub.Errf("headless_proxy: %s: unexpected argument %q", opt, sub.Val())
	}
	// NextSegment consumes an empty block without returning it: the cursor
	// is then on its "}", and reverse_proxy would be handed a stray "{" and
	// blame the option.
	if d.Val() == "}" && seg[len(seg)-1].Text != "}" {
		return d.Errf("headless_proxy: %s takes no block (its arguments go on its line)", opt)
	}
	return nil
}

// reverseProxyOf parses the directive at d, its source options taken out,
// as reverse_proxy: the handler has no upstreams and the departure defaults.
//
// reverse_proxy is handed the directive without the service references. If
// a scheme was given, it gets one placeholder upstream with that scheme, so
// that it sets up (and checks) the transport exactly as it does for
// `reverse_proxy https://…`; the placeholder is dropped afterwards.
func reverseProxyOf(h httpcaddyfile.Helper, d *caddyfile.Dispenser, scheme string, nrefs int) (*reverseproxy.Handler, error) {
	d.Reset()
	d.Next()
	seg := d.NextSegment()
	toks := []caddyfile.Token{seg[0]}
	if scheme != "" {
		placeholder := seg[0]
		placeholder.Text = scheme + "://headless"
		toks = append(toks, placeholder)
	}
	toks = append(toks, seg[1+nrefs:]...)

	rp := new(reverseproxy.Handler)
	if err := rp.UnmarshalCaddyfile(caddyfile.NewDispenser(toks)); err != nil {
		return nil, err
	}
	if err := rp.FinalizeUnmarshalCaddyfile(h); err != nil {
		return nil, err
	}
	rp.Upstreams = nil
	if err := departureDefaults(rp, toks); err != nil {
		return nil, d.Errf("headless_proxy: %v", err)
	}
	return rp, nil
}

// The defaults an endpoint that leaves must not cost a request under
// (docs/design.md, "Endpoints that leave"); the user's own settings win.
const (
	// DefaultRetries: a request whose try failed is tried again on another
	// endpoint, at once, up to this many times. reverse_proxy retries a
	// failed dial for every method (nothing was sent) and other errors only
	// for GET; the endpoint that failed is set aside meanwhile.
	DefaultRetries = 2
	// DefaultDialTimeout bounds a connection attempt to an endpoint: one in
	// the cluster connects in milliseconds, a lost node never answers. Below
	// Linux's 1 s SYN retransmission: a connect not done by then lost its SYN
	// or its peer, and a retry elsewhere is cheaper than Caddy's 3 s wait.
	// It also bounds the request that first meets a dead endpoint which a
	// DNS cache reveals late (after it died) to well under a second.
	DefaultDialTimeout = 750 * time.Millisecond
)

// departureDefaults sets lb_retries and the http transport's dial_timeout on
// rp, the handler parsed from toks, where the user set neither (nor
// lb_try_duration, which bounds retries by time instead).
func departureDefaults(rp *reverseproxy.Handler, toks []caddyfile.Token) error {
	set := map[string]bool{}
	d := caddyfile.NewDispenser(toks)
	d.Next()
	d.RemainingArgs()
	for d.NextBlock(0) {
		if d.Nesting() == 1 {
			set[d.Val()] = true
			d.RemainingArgs() // its arguments are values, not options: `header_up X-A lb_retries`
		}
	}
	if !set["lb_retries"] && !set["lb_try_duration"] {
		if rp.LoadBalancing == nil {
			rp.LoadBalancing = new(reverseproxy.LoadBalancing)
		}
		rp.LoadBalancing.Retries = DefaultRetries
	}
	if rp.TransportRaw == nil {
		rp.TransportRaw = caddyconfig.JSONModuleObject(reverseproxy.HTTPTransport{DialTimeout: caddy.Duration(DefaultDialTimeout)}, "protocol", "http", nil)
		return nil
	}
	var t map[string]json.RawMessage
	if err := json.Unmarshal(rp.TransportRaw, &t); err != nil {
		return fmt.Errorf("reading the transport: %v", err)
	}
	if string(t["protocol"]) != `"http"` || t["dial_timeout"] != nil {
		return nil
	}
	t["dial_timeout"] = json.RawMessage(strconv.FormatInt(int64(DefaultDialTimeout), 10))
	raw, err := json.Marshal(t)
	if err != nil {
		return err
	}
	rp.TransportRaw = raw
	return nil
}

// splitScheme splits the current argument into a service reference and its
// scheme ("" if none), giving a scheme without a port its default port.
func splitScheme(d *caddyfile.Dispenser) (ref, scheme string, err error) {
	ref = d.Val()
	scheme, rest, ok := strings.Cut(ref, "://")
	if !ok {
		return ref, "", nil
	}
	port := ""
	switch scheme {
	case "http", "h2c":
		port = "80"
	case "https":
		port = "443"
	case "ws", "wss":
		return "", "", d.Errf("headless_proxy: %q: the scheme %s:// is only supported in browsers; use http:// or https://", ref, scheme)
	default:
		return "", "", d.Errf("headless_proxy: %q: unsupported scheme %s:// (use http://, https:// or h2c://)", ref, scheme)
	}
	if strings.ContainsAny(rest, "/?#") {
		return "", "", d.Errf("headless_proxy: %q: a service reference has no path, query or fragment (use rewrite or handle_path for paths)", ref)
	}
	if !strings.Contains(rest, ":") {
		rest += ":" + port
	}
	return rest, scheme, nil
}

func schemeOf(s string) string {
	if s == "" {
		return "no scheme"
	}
	return s + "://"
}

// probeTLSFrom takes the server name and verification switch of the http
// transport's TLS settings, for HTTPS health checks.
func probeTLSFrom(transport json.RawMessage) *HealthTLS {
	var t struct {
		TLS *struct {
			ServerName         string `json:"server_name"`
			InsecureSkipVerify bool   `json:"insecure_skip_verify"`
		} `json:"tls"`
	}
	out := new(HealthTLS)
	if json.Unmarshal(transport, &t) == nil && t.TLS != nil {
		out.ServerName, out.InsecureSkipVerify = t.TLS.ServerName, t.TLS.InsecureSkipVerify
	}
	return out
}
