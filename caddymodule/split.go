package caddymodule

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/caddy-headless/caddy-headless/discovery"
)

// A source with several Services (`services`, or several references after
// headless_proxy) splits requests between them: the core's discovery.Split
// draws the Service, this file translates the request into the draw.

// configs checks service or services and returns a watcher configuration
// for each Service, in order. Like config, it is the one place these rules
// are checked, for Provision and the Caddyfile parsers alike.
func (h *Headless) configs(det discovery.Detected) ([]discovery.Config, error) {
	if len(h.Services) == 0 {
		cfg, err := h.config(det)
		if err != nil {
			return nil, err
		}
		return []discovery.Config{cfg}, nil
	}
	if h.Service != "" {
		return nil, fmt.Errorf("headless: set service (one Service) or services (several), not both: service is %q", h.Service)
	}
	if len(h.Services) > discovery.MaxSplitServices {
		return nil, fmt.Errorf("headless: at most %d services per source, got %d", discovery.MaxSplitServices, len(h.Services))
	}
	weighted, primaries := 0, 0
	out := make([]discovery.Config, 0, len(h.Services))
	seen := map[string]string{}
	for _, ws := range h.Services {
		one := *h
		one.Service, one.Services = ws.Service, nil
		cfg, err := one.config(det)
		if err != nil {
			return nil, err
		}
		q := cfg.Service.String()
		if first, dup := seen[q]; dup {
			return nil, fmt.Errorf("headless: %s is named twice (as %q and %q): each of its endpoints would be listed twice", q, first, ws.Service)
		}
		seen[q] = ws.Service
		if ws.Weight != nil {
			weighted++
			switch w := *ws.Weight; {
			case w < 0:
				return nil, fmt.Errorf("headless %s: weight must be 0 (a backup) or more, got %d", ws.Service, w)
			case w > 1_000_000:
				return nil, fmt.Errorf("headless %s: weight must be at most 1000000, got %d", ws.Service, w)
			case w > 0:
				primaries++
			}
		}
		out = append(out, cfg)
	}
	switch {
	case weighted != 0 && weighted != len(h.Services):
		return nil, fmt.Errorf("headless %s: give a weight to every Service or to none (%d of %d have one)", h.names(), weighted, len(h.Services))
	case weighted != 0 && primaries == 0:
		return nil, fmt.Errorf("headless %s: %s", h.names(), errAllBackups)
	}
	return out, nil
}

const errAllBackups = "every weight is 0 (a backup): give at least one Service a weight above 0"

// checkPolicy refuses lb_policy weighted_round_robin on the reverse_proxy
// handler above the source (in mods, from the root down): it weighs the
// positions in the list of upstreams, which here are endpoints that come
// and go, so the first endpoint would get the first weight's share and most
// endpoints nothing.
func checkPolicy(mods []caddy.Module) error {
	if rp := parentProxy(mods); rp != nil {
		if rp.LoadBalancing != nil {
			if _, wrr := rp.LoadBalancing.SelectionPolicy.(*reverseproxy.WeightedRoundRobinSelection); wrr {
				return errWeightedRoundRobin
			}
		}
		return nil
	}
	return nil
}

var errWeightedRoundRobin = fmt.Errorf("lb_policy weighted_round_robin weighs positions in the list of upstreams, " +
	"which here are endpoints that come and go: the first endpoints would get the weights' shares and the others nothing. " +
	"To split requests between Services, name them in one headless source with weights " +
	"(headless_proxy vm.bbs:8001 pods.bbs:8001 { weights 90 10 }, or `services` with a `weight` each in JSON); " +
	"to spread them over endpoints use lb_policy random, round_robin or least_conn")

// splitDraw returns the draw in [0,1) that decides a request's Service and,
// for the cookie policy, the Service the client's cookie names (-1 none).
type splitDraw func(r *http.Request) (u float64, prefer int)

// newSplit builds the split of the provisioned uses, drawing the way the
// lb_policy of the handler above (in mods) chooses: by the same key for the
// hashing and cookie policies, so a client stays on one side, else at random.
func (h *Headless) newSplit(mods []caddy.Module) (*discovery.Split, splitDraw) {
	sp := &discovery.Split{ByEndpoints: h.Services[0].Weight == nil}
	for i, u := range h.uses {
		m := discovery.SplitMember{Watcher: u.watcher, Sampler: u.sampler}
		if w := h.Services[i].Weight; w != nil {
			m.Weight = *w
		}
		sp.Members = append(sp.Members, m)
	}
	random := func(*http.Request) (float64, int) { return rand.Float64(), -1 }
	var pol reverseproxy.Selector
	if rp := parentProxy(mods); rp != nil && rp.LoadBalancing != nil {
		pol = rp.LoadBalancing.SelectionPolicy
	}
	byKey := func(key func(r *http.Request) string) splitDraw {
		return func(r *http.Request) (float64, int) {
			k := key(r)
			if k == "" {
				return rand.Float64(), -1
			}
			return unitHash(k), -1
		}
	}
	switch pol := pol.(type) {
	case *reverseproxy.IPHashSelection:
		return sp, byKey(func(r *http.Request) string {
			ip, _, err := net.SplitHostPort(r.RemoteAddr)
			if err != nil {
				return r.RemoteAddr
			}
			return ip
		})
	case *reverseproxy.ClientIPHashSelection:
		return sp, byKey(func(r *http.Request) string {
			addr, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
			if ip, _, err := net.SplitHostPort(addr); err == nil {
				return ip
			}
			return addr
		})
	case *reverseproxy.URIHashSelection:
		return sp, byKey(func(r *http.Request) string { return r.RequestURI })
	case *reverseproxy.QueryHashSelection:
		return sp, byKey(func(r *http.Request) string { return strings.Join(r.URL.Query()[pol.Key], ",") })
	case *reverseproxy.HeaderHashSelection:
		return sp, byKey(func(r *http.Request) string {
			if strings.EqualFold(pol.Field, "Host") {
				return r.Host
			}
			return r.Header.Get(pol.Field)
		})
	case *reverseproxy.CookieHashSelection:
		name, secret := pol.Name, pol.Secret
		if name == "" {
			name = "lb"
		}
		return sp, func(r *http.Request) (float64, int) {
			c, err := r.Cookie(name)
			if err != nil || c.Value == "" {
				return rand.Float64(), -1
			}
			// The cookie names an endpoint (an HMAC of its address): its
			// Service serves the client while it has it.
			return rand.Float64(), sp.Holding(func(dial string) bool {
				return hmac.Equal([]byte(hmacHex(secret, dial)), []byte(c.Value))
			})
		}
	}
	return sp, random
}

// hmacHex is the cookie policy's value for the endpoint dial.
func hmacHex(secret, dial string) string {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(dial))
	return hex.EncodeToString(m.Sum(nil))
}

// unitHash maps key to [0,1) with 64-bit FNV-1a, the same on every replica
// and across restarts.
func unitHash(key string) float64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(key); i++ {
		h ^= uint64(key[i])
		h *= 1099511628211
	}
	// FNV's low bits mix poorly for short keys: fold the high ones in.
	h ^= h >> 29
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 32
	return float64(h>>11) / (1 << 53)
}

// splitUpstreams is GetUpstreams with several Services.
func (h *Headless) splitUpstreams(r *http.Request) ([]*reverseproxy.Upstream, error) {
	retry := h.retried(r)
	u, prefer := h.draw(r)
	eps, err := h.split.Candidates(r.Context(), u, prefer, retry)
	if err != nil {
		return nil, err
	}
	return upstreamsOf(eps), nil
}

// addService takes the current token as one more Service: the source
// becomes a split. Its weights come from the weights option.
func (h *Headless) addService(d *caddyfile.Dispenser) error {
	if _, err := discovery.ParseService(d.Val(), discovery.Defaults{}); err != nil {
		return d.Errf("headless: %v", err)
	}
	if h.Service != "" {
		h.Services = []WeightedService{{Service: h.Service}}
		h.Service = ""
	}
	h.Services = append(h.Services, WeightedService{Service: d.Val()})
	return nil
}

// unmarshalWeights parses `weights <weight>...`, one per Service already
// named, in order.
func (h *Headless) unmarshalWeights(d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(h.Services) == 0 {
		return d.Errf("headless: weights split requests between several Services, and one is named here: name them all (headless_proxy vm.bbs:8001 pods.bbs:8001 { weights 90 10 })")
	}
	if len(args) != len(h.Services) {
		return d.Errf("headless: weights takes one weight per Service, in order (%d for %s), got %d", len(h.Services), h.names(), len(args))
	}
	for i, a := range args {
		w, err := strconv.Atoi(a)
		if err != nil || w < 0 {
			return d.Errf("headless: weights: %q is not a weight (a whole number, 0 for a backup)", a)
		}
		h.Services[i].Weight = &w
	}
	if !slices.ContainsFunc(h.Services, func(ws WeightedService) bool { return *ws.Weight > 0 }) {
		return d.Errf("headless %s: %s", h.names(), errAllBackups) // configs checks it too, at the block's end
	}
	return nil
}
