package discovery

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"net/url"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-headless/caddy-headless/kubeapi"
)

// `via api`: the same Service, read from the EndpointSlices the apiserver
// pushes instead of asked from DNS. A Watcher whose Config has an API runs
// runAPI instead of the DNS loop: it lists the Service's EndpointSlices,
// watches from the list's resourceVersion, and publishes a Snapshot after
// every change, through the same publish (health, aside, candidates) as
// DNS answers. Only the source differs.

// APISource is the apiserver `via api` watches, as `storage k8s` names it.
type APISource struct {
	// Endpoint is https://host:port.
	Endpoint string
	// CAFile is the PEM file of the apiserver's CA; empty: the system's roots.
	CAFile string
	// TokenFile holds the bearer token, re-read as it rotates; empty: none.
	TokenFile string
}

func (a *APISource) key() string {
	if a == nil {
		return " via=dns"
	}
	return fmt.Sprintf(" via=api endpoint=%q ca=%q token=%q", a.Endpoint, a.CAFile, a.TokenFile)
}

// EndpointSlices of discovery.k8s.io/v1.
var endpointSlices = kubeapi.Resource{Path: "/apis/discovery.k8s.io/v1", Plural: "endpointslices"}

// apiWatchTimeout is the timeoutSeconds a watch asks for: the apiserver
// ends the stream then (it picks at random between it and twice it
// otherwise), and the watch goes on from the last resourceVersion seen.
const apiWatchTimeout = 5 * time.Minute

// apiListTimeout bounds one list request.
const apiListTimeout = 10 * time.Second

// KubeName is the Service (and, for a per-pod reference, the endpoint's
// hostname) a Service reference names in Kubernetes: svc.ns.svc.<domain>
// or host.svc.ns.svc.<domain>. `via api` needs one of these.
func KubeName(s Service) (name, namespace, hostname string, err error) {
	labels := strings.Split(strings.TrimSuffix(s.FQDN, "."), ".")
	switch {
	case len(labels) >= 4 && labels[2] == "svc" && labels[3] != "svc":
		return labels[0], labels[1], "", nil
	case len(labels) >= 5 && labels[3] == "svc":
		return labels[1], labels[2], labels[0], nil
	}
	return "", "", "", fmt.Errorf("via api: %q is not a Kubernetes Service name (svc.namespace.svc.<cluster domain>, or a per-pod host.svc.namespace.svc.<cluster domain>): names outside the cluster need via dns", strings.TrimSuffix(s.FQDN, "."))
}

// APIState is what the EndpointSlice watch saw, as of one Snapshot.
type APIState struct {
	// ResourceVersion is the newest one seen (list, event or bookmark).
	ResourceVersion string
	// LastEvent is when the last event (or list) changed the slices.
	LastEvent time.Time
	// Slices counts the Service's EndpointSlices.
	Slices int
	// Endpoints are every endpoint of the slices at the Service's port, with
	// their conditions, sorted by address; Used tells those requests go to.
	Endpoints []APIEndpoint
}

// APIEndpoint is one address of an EndpointSlice endpoint.
type APIEndpoint struct {
	Dial                        string
	Ready, Serving, Terminating bool
	Zone, NodeName, Hostname    string
	Slice                       string
	// Used: requests go to it (ready; or serving and terminating while no
	// endpoint is ready). Refused: the address policy refused it, and why.
	Used    bool
	Refused string `json:",omitempty"`
}

// endpointSlice is the part of a discovery.k8s.io/v1 EndpointSlice read here.
type endpointSlice struct {
	Metadata struct {
		Name            string `json:"name"`
		ResourceVersion string `json:"resourceVersion"`
	} `json:"metadata"`
	AddressType string `json:"addressType"`
	Endpoints   []struct {
		Addresses  []string `json:"addresses"`
		Conditions struct {
			Ready       *bool `json:"ready"`
			Serving     *bool `json:"serving"`
			Terminating *bool `json:"terminating"`
		} `json:"conditions"`
		Hostname *string `json:"hostname"`
		NodeName *string `json:"nodeName"`
		Zone     *string `json:"zone"`
	} `json:"endpoints"`
	Ports []struct {
		Name     *string `json:"name"`
		Port     *int32  `json:"port"`
		Protocol *string `json:"protocol"`
	} `json:"ports"`
}

type sliceList struct {
	Metadata struct {
		ResourceVersion string `json:"resourceVersion"`
		Continue        string `json:"continue"`
	} `json:"metadata"`
	Items []endpointSlice `json:"items"`
}

// apiCounters are the watch's own counts (in Stats).
func (st *stats) apiEvent(events, relists, restarts uint64) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.s.Events += events
	st.s.Relists += relists
	st.s.StreamRestarts += restarts
}

// sliceSet is the Service's slices by name, as the watch keeps them.
type sliceSet struct {
	rv        string
	slices    map[string]*endpointSlice
	lastEvent time.Time
}

// apiResult computes the endpoints of set for cfg: the addresses of every
// slice at the port (a number: every slice, dialed there; a name: the slice
// port of that name, whose number may differ per slice), filtered by family
// and, for a per-pod reference, by hostname; ready ones, or if none is
// ready, serving-and-terminating ones; through the address policy; sorted
// and deduplicated.
func apiResult(cfg Config, host string, set *sliceSet) (Result, *APIState, error) {
	svc := cfg.Service
	res := Result{Outcome: OutcomeSuccess}
	st := &APIState{ResourceVersion: set.rv, LastEvent: set.lastEvent, Slices: len(set.slices)}
	names := make([]string, 0, len(set.slices))
	for n := range set.slices {
		names = append(names, n)
	}
	sort.Strings(names)
	var ready, draining []Endpoint
	portFound := svc.Port != 0
	for _, n := range names {
		sl := set.slices[n]
		switch sl.AddressType {
		case "IPv4":
			if !cfg.IPv4 {
				continue
			}
		case "IPv6":
			if !cfg.IPv6 {
				continue
			}
		default: // FQDN slices: not addresses
			continue
		}
		port := svc.Port
		if port == 0 {
			for _, p := range sl.Ports {
				if p.Name != nil && *p.Name == svc.PortName && p.Port != nil && (p.Protocol == nil || *p.Protocol == "TCP") {
					port = uint16(*p.Port)
					break
				}
			}
			if port == 0 {
				continue
			}
			portFound = true
		}
		for _, e := range sl.Endpoints {
			if host != "" && (e.Hostname == nil || *e.Hostname != host) {
				continue
			}
			c := e.Conditions
			// A nil condition means unknown, and the API says to read
			// ready as true then; serving defaults to ready.
			isReady := c.Ready == nil || *c.Ready
			serving := isReady
			if c.Serving != nil {
				serving = *c.Serving
			}
			terminating := c.Terminating != nil && *c.Terminating
			for _, a := range e.Addresses {
				ae := APIEndpoint{Ready: isReady, Serving: serving, Terminating: terminating, Slice: n,
					Zone: deref(e.Zone), NodeName: deref(e.NodeName), Hostname: deref(e.Hostname)}
				ip, err := netip.ParseAddr(a)
				ep := Endpoint{IP: ip, Port: port, Target: ""}
				if err != nil || ip.Zone() != "" {
					ae.Dial, ae.Refused = a, "not_an_ip"
					res.refuse(svc, Endpoint{Port: port}, "not_an_ip")
					st.Endpoints = append(st.Endpoints, ae)
					continue
				}
				ae.Dial = netip.AddrPortFrom(ip, port).String()
				if why := unusable(ep); why != "" {
					ae.Refused = why
				} else if why := cfg.Addresses.refuses(ip); why != "" {
					ae.Refused = why
				}
				if ae.Refused != "" {
					res.refuse(svc, ep, ae.Refused)
				} else if isReady {
					ready = append(ready, ep)
				} else if serving && terminating {
					draining = append(draining, ep)
				}
				st.Endpoints = append(st.Endpoints, ae)
			}
		}
	}
	use := ready
	if len(use) == 0 {
		use = draining // kube-proxy's terminating fallback
	}
	res.Endpoints = finish(use, &res.Dropped)
	used := make(map[string]bool, len(res.Endpoints))
	for _, e := range res.Endpoints {
		used[e.Dial] = true
	}
	for i := range st.Endpoints {
		st.Endpoints[i].Used = st.Endpoints[i].Refused == "" && used[st.Endpoints[i].Dial] &&
			(st.Endpoints[i].Ready || len(ready) == 0)
	}
	slices.SortStableFunc(st.Endpoints, func(a, b APIEndpoint) int { return strings.Compare(a.Dial, b.Dial) })
	name, ns, _, _ := KubeName(svc)
	var why error
	switch {
	case len(set.slices) == 0:
		res.Outcome = OutcomeNXDomain
		why = fmt.Errorf("service %s: no EndpointSlice labelled kubernetes.io/service-name=%s in namespace %s (via api): does the Service exist?", svc, name, ns)
	case !portFound:
		res.Outcome = OutcomeNoData
		why = fmt.Errorf("service %s: none of its %d EndpointSlices has a TCP port named %q (via api)", svc, len(set.slices), svc.PortName)
	case host != "" && len(st.Endpoints) == 0:
		res.Outcome = OutcomeNXDomain
		why = fmt.Errorf("service %s: no endpoint with hostname %q in the EndpointSlices of %s in namespace %s (via api)", svc, host, name, ns)
	case len(res.Endpoints) == 0:
		res.Outcome = OutcomeNoData
		why = fmt.Errorf("service %s has no ready (nor serving and terminating) endpoints in its %d EndpointSlices (via api): check the pods' readiness", svc, len(set.slices))
		if res.RefusedCount > 0 {
			why = fmt.Errorf("%w; %d refused by the address policy", why, res.RefusedCount)
		}
	}
	return res, st, why
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// clients holds one kubeapi.Client per apiserver setting, shared by every
// Watcher: one transport, so the watches of many Services are streams on
// a few HTTP/2 connections, not a connection each.
var clients struct {
	sync.Mutex
	m map[APISource]*apiClient
}

// apiClient is a shared client and the gate of its openings.
type apiClient struct {
	*kubeapi.Client
	// opening bounds the lists and watch openings in flight: when every
	// HTTP/2 connection is at its stream limit, each request in flight
	// dials a connection of its own, and 10,000 Watchers starting at once
	// left 4,265 connections open (TestMeasureAPIWatchers) instead of the
	// 40 that their streams need.
	opening chan struct{}
}

// maxOpening is the most lists and watch openings in flight per apiserver.
const maxOpening = 8

// sharedClient returns the client of a, making it (reading the CA and the
// token) if there is none yet; a failure is not kept, so a file that
// appears later is read on the next attempt.
func sharedClient(a APISource) (*apiClient, error) {
	clients.Lock()
	defer clients.Unlock()
	if c := clients.m[a]; c != nil {
		return c, nil
	}
	c, err := kubeapi.New(a.Endpoint, a.CAFile, a.TokenFile, apiListTimeout)
	if err != nil {
		return nil, err
	}
	if clients.m == nil {
		clients.m = map[APISource]*apiClient{}
	}
	ac := &apiClient{Client: c, opening: make(chan struct{}, maxOpening)}
	clients.m[a] = ac
	return ac, nil
}

// gate waits for a free opening slot; release gives it back.
func (c *apiClient) gate(ctx context.Context) (release func(), err error) {
	select {
	case c.opening <- struct{}{}:
		return func() { <-c.opening }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// apiRun is the state of one Watcher's watch, owned by runAPI.
type apiRun struct {
	w        *Watcher
	client   *apiClient
	name, ns string
	host     string
	set      sliceSet
	seq      uint64
	failures int
	down     bool // an outage is going on (its warning was logged)
}

// runAPI is the Watcher's loop under `via api`.
func (w *Watcher) runAPI(ctx context.Context) {
	defer close(w.done)
	r := &apiRun{w: w}
	var err error
	if r.name, r.ns, r.host, err = KubeName(w.cfg.Service); err != nil {
		r.fail(err)
		<-ctx.Done()
		return
	}
	for ctx.Err() == nil {
		if err := r.once(ctx); err != nil && ctx.Err() == nil {
			r.failures++
			r.fail(err)
			if !r.sleep(ctx, backoff(r.failures)) {
				return
			}
		}
	}
}

// backoff is the wait after the n-th failure in a row: 250ms doubling to
// MaxErrorBackoff, with full jitter in its upper half.
func backoff(n int) time.Duration {
	d := min(250*time.Millisecond<<min(n-1, 10), MaxErrorBackoff)
	return d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
}

// sleep waits d, answering kicks meanwhile; false if ctx ended.
func (r *apiRun) sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			return true
		case <-r.w.kick:
			r.republish()
		}
	}
}

// once lists if needed, then watches until the stream ends. It returns
// nil when the stream ended normally (go on watching), an error otherwise.
func (r *apiRun) once(ctx context.Context) error {
	w := r.w
	if r.client == nil {
		c, err := sharedClient(*w.cfg.API)
		if err != nil {
			return fmt.Errorf("via api: the apiserver at %s could not be used: %w", w.cfg.API.Endpoint, err)
		}
		r.client = c
	}
	sel := url.Values{"labelSelector": {"kubernetes.io/service-name=" + r.name}}
	if r.set.rv == "" {
		set := sliceSet{slices: map[string]*endpointSlice{}}
		cont := ""
		for {
			q := url.Values{"labelSelector": sel["labelSelector"], "limit": {"500"}}
			if cont != "" {
				q.Set("continue", cont)
			}
			var page sliceList
			release, err := r.client.gate(ctx)
			if err != nil {
				return err
			}
			err = r.client.Do(ctx, "list", endpointSlices, r.ns, "", q.Encode(), nil, &page)
			release()
			if err != nil {
				return err
			}
			for i := range page.Items {
				set.slices[page.Items[i].Metadata.Name] = &page.Items[i]
			}
			set.rv = page.Metadata.ResourceVersion
			if cont = page.Metadata.Continue; cont == "" {
				break
			}
		}
		set.lastEvent = time.Now()
		r.set = set
		w.stats.apiEvent(0, 1, 0)
		r.publish()
	}
	q := url.Values{"labelSelector": sel["labelSelector"], "resourceVersion": {r.set.rv},
		"allowWatchBookmarks": {"true"}, "timeoutSeconds": {fmt.Sprint(int(apiWatchTimeout / time.Second))}}
	release, err := r.client.gate(ctx)
	if err != nil {
		return err
	}
	stream, err := r.client.Watch(ctx, endpointSlices, r.ns, q.Encode())
	release()
	if err != nil {
		if kubeapi.IsGone(err) {
			// kube-apiserver reports a resourceVersion too old for its watch
			// cache as an ERROR event in the stream (below; k8s.io/apiserver
			// cacher.Watch); a 410 on the request itself would come from
			// something else on the way. Either way: list again.
			r.set.rv = ""
			return nil
		}
		return err
	}
	if r.down || r.failures > 0 {
		r.recovered()
	}
	opened := time.Now()
	events := make(chan streamItem)
	var wg sync.WaitGroup
	wg.Add(1)
	stop := make(chan struct{})
	go func() {
		defer wg.Done()
		for {
			ev, err := stream.Next()
			select {
			case events <- streamItem{ev, err}:
			case <-stop:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	defer func() {
		close(stop)
		stream.Close()
		wg.Wait()
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-w.kick:
			r.republish()
		case it := <-events:
			if it.err != nil {
				w.stats.apiEvent(0, 0, 1)
				switch {
				case kubeapi.IsGone(it.err):
					r.set.rv = ""
					return nil
				case errors.Is(it.err, io.EOF) && time.Since(opened) > time.Second:
					return nil // the apiserver's timeout: watch on
				case errors.Is(it.err, io.EOF):
					return errors.New("via api: the apiserver ended the watch at once")
				}
				return it.err
			}
			if err := r.apply(it.ev); err != nil {
				return err
			}
		}
	}
}

type streamItem struct {
	ev  kubeapi.Event
	err error
}

// apply takes one watch event.
func (r *apiRun) apply(ev kubeapi.Event) error {
	var sl endpointSlice
	if err := json.Unmarshal(ev.Object, &sl); err != nil {
		return fmt.Errorf("via api: a %s event of the watch did not decode: %w", ev.Type, err)
	}
	if sl.Metadata.ResourceVersion != "" {
		r.set.rv = sl.Metadata.ResourceVersion
	}
	if ev.Type == "BOOKMARK" {
		return nil
	}
	r.w.stats.apiEvent(1, 0, 0)
	if ev.Type == "DELETED" {
		delete(r.set.slices, sl.Metadata.Name)
	} else {
		r.set.slices[sl.Metadata.Name] = &sl
	}
	r.set.lastEvent = time.Now()
	r.publish()
	return nil
}

// publish makes the Snapshot of the current slices.
func (r *apiRun) publish() {
	w := r.w
	now := time.Now()
	res, st, why := apiResult(w.cfg, r.host, &r.set)
	res.Server = w.cfg.API.Endpoint
	prev := w.snap.Load()
	r.seq++
	w.started.Store(r.seq)
	s := &Snapshot{Service: w.cfg.Service}
	if prev != nil {
		*s = *prev
	}
	s.Seq, s.Endpoints, s.Outcome, s.Server, s.API = r.seq, res.Endpoints, res.Outcome, w.cfg.API.Endpoint, st
	s.Resolved, s.Err, s.ErrAt, s.StaleSince, s.Expired, s.Next = now, nil, time.Time{}, time.Time{}, false, time.Time{}
	s.Unavailable = why
	log := w.logger.Load()
	quiet := prev
	if prev != nil && prev.Err != nil {
		p := *prev
		p.Err = nil
		quiet = &p
	}
	w.logChange(log, quiet, s, res)
	if res.RefusedCount > 0 && w.warned.due(&w.warned.bound, "refused", now) {
		log.Warn("EndpointSlice addresses refused by the address policy", zap.String("service", w.cfg.Service.String()),
			zap.Int("refused", res.RefusedCount), zap.Stringers("first", refusedList(res.Refused)))
	}
	w.stats.lookup(res.Outcome, 0, res)
	w.publish(s)
}

func refusedList(rs []RefusedEndpoint) []fmt.Stringer {
	out := make([]fmt.Stringer, len(rs))
	for i := range rs {
		out[i] = rs[i]
	}
	return out
}

// republish answers a kick (RefreshNow, a retried request): the watch is
// already as fresh as it gets, so the same state goes out as a new Snapshot.
func (r *apiRun) republish() {
	w := r.w
	prev := w.snap.Load()
	if prev == nil {
		return // the first list is still under way; it publishes
	}
	s := *prev
	r.seq++
	w.started.Store(r.seq)
	s.Seq = r.seq
	w.publish(&s)
}

// fail records a failed list or watch: the last set is kept (within
// Stale), and one warning is logged per outage.
func (r *apiRun) fail(err error) {
	w := r.w
	svc := w.cfg.Service
	now := time.Now()
	if r.name != "" {
		err = fmt.Errorf("service %s in namespace %s: %w", r.name, r.ns, err)
	}
	prev := w.snap.Load()
	s := &Snapshot{Service: svc}
	if prev != nil {
		*s = *prev
	}
	r.seq++
	w.started.Store(r.seq)
	s.Seq, s.Outcome, s.Err, s.ErrAt = r.seq, OutcomeNetwork, err, now
	if kubeapi.IsCode(err, 401) || kubeapi.IsCode(err, 403) {
		s.Outcome = OutcomeRefused
	}
	consequence, dropped := w.keepLastSet(s, err, now, "the apiserver")
	if dropped {
		r.down = false // warn again for the drop
	}
	w.stats.lookup(s.Outcome, 0, Result{})
	if !r.down {
		r.down = true
		w.logger.Load().Warn("via api: listing or watching EndpointSlices failed; "+consequence+" (logged once per outage)",
			zap.String("service", svc.String()), zap.String("namespace", r.ns), zap.String("apiserver", w.cfg.API.Endpoint),
			zap.Error(err))
	}
	w.publish(s)
}

// recovered logs the end of an outage.
func (r *apiRun) recovered() {
	if r.down {
		prev := r.w.snap.Load()
		fields := []zap.Field{zap.String("service", r.w.cfg.Service.String()), zap.Int("failures", r.failures)}
		if prev != nil && !prev.ErrAt.IsZero() {
			fields = append(fields, zap.Time("failing_since", prev.ErrAt))
		}
		r.w.logger.Load().Info("via api: the EndpointSlice watch recovered", fields...)
	}
	r.down, r.failures = false, 0
	// A watch that opened after a failure without a relist: the snapshot
	// still carries the error; publish the slices again to clear it.
	if s := r.w.snap.Load(); s != nil && s.Err != nil && r.set.slices != nil {
		r.publish()
	}
}
