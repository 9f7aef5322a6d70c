// Package apitest is an in-process fake of the EndpointSlice part of the
// Kubernetes API (discovery.k8s.io/v1), for fast unit tests of `via api`.
// It answers the way kube-apiserver does: a list carries the collection's
// resourceVersion; a watch from it streams the later events as
// newline-delimited JSON, with BOOKMARK events when asked for
// (allowWatchBookmarks) and an ERROR event with a 410 Expired Status when
// the resourceVersion asked for was compacted away; 401 for a wrong token,
// 403 with the apiserver's message for a verb the token may not use in a
// namespace. The integration suite runs the real apiserver.
package apitest

import (
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// API is the fake apiserver.
type API struct {
	srv       *httptest.Server
	TokenFile string // holds the token the server accepts
	CAFile    string // the server's certificate

	mu        sync.Mutex
	changed   chan struct{} // closed and replaced on every change
	token     string
	allowed   map[string]bool // "verb namespace" the token may use
	slices    map[string]map[string]any
	rv        int
	log       []event // every change, oldest first
	compacted int     // a watch from a resourceVersion below this gets 410
	logStart  int     // resourceVersion of log[0]
	conns     int     // connections accepted
	open      int     // connections open now
	down      bool
	streams   map[int]chan struct{} // open watches; closed to end one
	nextID    int
	requests  []string // "verb namespace" of every request
}

type event struct {
	rv  int
	typ string
	ns  string
	obj map[string]any
}

// New starts the fake; the token may list and watch in namespaces.
func New(t testing.TB, namespaces ...string) *API {
	t.Helper()
	f := &API{token: "token-1", allowed: map[string]bool{}, slices: map[string]map[string]any{},
		changed: make(chan struct{}), streams: map[int]chan struct{}{}, rv: 100}
	for _, ns := range namespaces {
		f.Allow("list", ns)
		f.Allow("watch", ns)
	}
	// HTTP/2, as kube-apiserver: many watches share one connection.
	f.srv = httptest.NewUnstartedServer(http.HandlerFunc(f.serve))
	f.srv.EnableHTTP2 = true
	f.srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		f.mu.Lock()
		defer f.mu.Unlock()
		switch st {
		case http.StateNew:
			f.conns++
			f.open++
		case http.StateClosed, http.StateHijacked:
			f.open--
		}
	}
	f.srv.StartTLS()
	t.Cleanup(func() { f.EndStreams(); f.srv.Close() })
	dir := t.TempDir()
	f.TokenFile, f.CAFile = filepath.Join(dir, "token"), filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(f.TokenFile, []byte(f.token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: f.srv.Certificate().Raw})
	if err := os.WriteFile(f.CAFile, cert, 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// URL is the endpoint, https://127.0.0.1:port.
func (f *API) URL() string { return f.srv.URL }

// Allow lets the token use verb (list, watch) in ns; Deny takes it back.
func (f *API) Allow(verb, ns string) { f.mu.Lock(); f.allowed[verb+" "+ns] = true; f.mu.Unlock() }

// Deny takes back what Allow gave.
func (f *API) Deny(verb, ns string) { f.mu.Lock(); delete(f.allowed, verb+" "+ns); f.mu.Unlock() }

// SetDown makes the fake answer 503 to everything and ends open watches
// (as a stopped apiserver breaks them); SetDown(false) brings it back.
func (f *API) SetDown(d bool) {
	f.mu.Lock()
	f.down = d
	f.mu.Unlock()
	if d {
		f.EndStreams()
	}
}

// EndStreams ends every open watch, as an apiserver does at its timeout.
func (f *API) EndStreams() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for id, ch := range f.streams {
		close(ch)
		delete(f.streams, id)
	}
}

// Compact forgets the events so far: a watch from an older resourceVersion
// gets 410 Gone (an ERROR event), which a client answers with a new list.
func (f *API) Compact() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.compacted = f.rv + 1
	f.log = nil
	f.logStart = f.rv + 1
}

// Requests returns "list namespace" or "watch namespace from rv" of every
// request so far.
func (f *API) Requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.requests...)
}

// Conns is the number of connections the fake accepted, and of those
// still open.
func (f *API) Conns() (accepted, open int) { f.mu.Lock(); defer f.mu.Unlock(); return f.conns, f.open }

// Streams is the number of open watches.
func (f *API) Streams() int { f.mu.Lock(); defer f.mu.Unlock(); return len(f.streams) }

// Bookmark sends a BOOKMARK event at the current resourceVersion to every
// watch that asked for them.
func (f *API) Bookmark() { f.record("BOOKMARK", "", nil) }

// Apply creates or replaces an EndpointSlice (any JSON-able value, such as
// Slice's) in ns.
func (f *API) Apply(ns string, slice any) {
	b, err := json.Marshal(slice)
	if err != nil {
		panic(err)
	}
	var obj map[string]any
	if err := json.Unmarshal(b, &obj); err != nil {
		panic(err)
	}
	meta, _ := obj["metadata"].(map[string]any)
	name, _ := meta["name"].(string)
	meta["namespace"] = ns
	typ := "MODIFIED"
	f.mu.Lock()
	if f.slices[ns] == nil {
		f.slices[ns] = map[string]any{}
	}
	if _, ok := f.slices[ns][name]; !ok {
		typ = "ADDED"
	}
	f.mu.Unlock()
	f.record(typ, ns, obj)
}

// Delete removes the EndpointSlice name of ns.
func (f *API) Delete(ns, name string) {
	f.mu.Lock()
	obj, ok := f.slices[ns][name].(map[string]any)
	f.mu.Unlock()
	if ok {
		f.record("DELETED", ns, obj)
	}
}

func (f *API) record(typ, ns string, obj map[string]any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rv++
	if obj != nil {
		obj = clone(obj)
		obj["metadata"].(map[string]any)["resourceVersion"] = strconv.Itoa(f.rv)
		name := obj["metadata"].(map[string]any)["name"].(string)
		if typ == "DELETED" {
			delete(f.slices[ns], name)
		} else {
			f.slices[ns][name] = obj
		}
	}
	if len(f.log) == 0 {
		f.logStart = f.rv
	}
	f.log = append(f.log, event{rv: f.rv, typ: typ, ns: ns, obj: obj})
	close(f.changed)
	f.changed = make(chan struct{})
}

func clone(m map[string]any) map[string]any {
	b, _ := json.Marshal(m)
	var c map[string]any
	_ = json.Unmarshal(b, &c)
	return c
}

func status(w http.ResponseWriter, code int, reason, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string]any{"kind": "Status", "apiVersion": "v1", "metadata": map[string]any{},
		"status": "Failure", "message": msg, "reason": reason, "code": code})
}

const prefix = "/apis/discovery.k8s.io/v1/namespaces/"

func (f *API) serve(w http.ResponseWriter, r *http.Request) {
	rest, ok := strings.CutPrefix(r.URL.Path, prefix)
	ns, res, _ := strings.Cut(rest, "/")
	if !ok || res != "endpointslices" || r.Method != http.MethodGet {
		status(w, http.StatusNotFound, "NotFound", "the server could not find the requested resource")
		return
	}
	q := r.URL.Query()
	verb := "list"
	if q.Get("watch") == "1" || q.Get("watch") == "true" {
		verb = "watch"
	}
	f.mu.Lock()
	if verb == "watch" {
		f.requests = append(f.requests, "watch "+ns+" from "+q.Get("resourceVersion"))
	} else {
		f.requests = append(f.requests, verb+" "+ns)
	}
	down, token, allowed := f.down, f.token, f.allowed[verb+" "+ns]
	f.mu.Unlock()
	switch {
	case down:
		status(w, http.StatusServiceUnavailable, "ServiceUnavailable", "the apiserver is shutting down")
		return
	case r.Header.Get("Authorization") != "Bearer "+token:
		status(w, http.StatusUnauthorized, "Unauthorized", "Unauthorized")
		return
	case !allowed:
		status(w, http.StatusForbidden, "Forbidden", fmt.Sprintf(
			`endpointslices.discovery.k8s.io is forbidden: User "system:serviceaccount:caddy:caddy" cannot %s resource "endpointslices" in API group "discovery.k8s.io" in the namespace %q`, verb, ns))
		return
	}
	sel, selVal, _ := strings.Cut(q.Get("labelSelector"), "=")
	match := func(obj map[string]any) bool {
		if sel == "" {
			return true
		}
		labels, _ := obj["metadata"].(map[string]any)["labels"].(map[string]any)
		v, _ := labels[sel].(string)
		return v == selVal
	}
	if verb == "list" {
		f.mu.Lock()
		var items []any
		var names []string
		for name := range f.slices[ns] {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			if obj := f.slices[ns][name].(map[string]any); match(obj) {
				items = append(items, obj)
			}
		}
		rv := f.rv
		f.mu.Unlock()
		if items == nil {
			items = []any{}
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
			"metadata": map[string]any{"resourceVersion": strconv.Itoa(rv)}, "items": items})
		return
	}
	f.watch(w, r, ns, match)
}

func (f *API) watch(w http.ResponseWriter, r *http.Request, ns string, match func(map[string]any) bool) {
	q := r.URL.Query()
	from, err := strconv.Atoi(q.Get("resourceVersion"))
	if err != nil {
		status(w, http.StatusBadRequest, "BadRequest", "this fake needs a resourceVersion to watch from")
		return
	}
	bookmarks := q.Get("allowWatchBookmarks") == "true"
	var timeout <-chan time.Time
	if s, err := strconv.Atoi(q.Get("timeoutSeconds")); err == nil && s > 0 {
		timeout = time.After(time.Duration(s) * time.Second)
	}
	f.mu.Lock()
	id := f.nextID
	f.nextID++
	end := make(chan struct{})
	f.streams[id] = end
	f.mu.Unlock()
	defer func() { f.mu.Lock(); delete(f.streams, id); f.mu.Unlock() }()
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	fl := w.(http.Flusher)
	fl.Flush()
	enc := json.NewEncoder(w)
	for {
		f.mu.Lock()
		if from < f.compacted-1 {
			f.mu.Unlock()
			_ = enc.Encode(map[string]any{"type": "ERROR", "object": map[string]any{"kind": "Status", "apiVersion": "v1",
				"status": "Failure", "reason": "Expired", "code": 410,
				"message": fmt.Sprintf("too old resource version: %d (%d)", from, f.compacted-1)}})
			fl.Flush()
			return
		}
		var out []event
		for _, e := range f.log[min(max(from+1-f.logStart, 0), len(f.log)):] { // rv = logStart + index
			if e.rv > from && (e.typ == "BOOKMARK" || e.ns == ns && match(e.obj)) {
				out = append(out, e)
			}
		}
		if len(f.log) > 0 {
			from = max(from, f.log[len(f.log)-1].rv)
		}
		changed := f.changed
		f.mu.Unlock()
		for _, e := range out {
			obj := e.obj
			if e.typ == "BOOKMARK" {
				if !bookmarks {
					continue
				}
				obj = map[string]any{"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
					"metadata": map[string]any{"resourceVersion": strconv.Itoa(e.rv)}}
			}
			if err := enc.Encode(map[string]any{"type": e.typ, "object": obj}); err != nil {
				return
			}
		}
		fl.Flush()
		select {
		case <-changed:
		case <-end:
			return
		case <-timeout:
			return
		case <-r.Context().Done():
			return
		}
	}
}

// Endpoint is one endpoint of a Slice.
type Endpoint struct {
	Addresses   []string
	Ready       bool
	Serving     bool
	Terminating bool
	Hostname    string
	NodeName    string
	Zone        string
}

// Port is one port of a Slice; an empty Name is the unnamed port.
type Port struct {
	Name string
	Port int
}

// Slice builds an EndpointSlice of Service svc, as the EndpointSlice
// controller writes it.
func Slice(name, svc, addressType string, ports []Port, eps ...Endpoint) map[string]any {
	var ps, es []any
	for _, p := range ports {
		ps = append(ps, map[string]any{"name": p.Name, "port": p.Port, "protocol": "TCP"})
	}
	for _, e := range eps {
		m := map[string]any{"addresses": e.Addresses, "conditions": map[string]any{
			"ready": e.Ready, "serving": e.Serving, "terminating": e.Terminating}}
		if e.Hostname != "" {
			m["hostname"] = e.Hostname
		}
		if e.NodeName != "" {
			m["nodeName"] = e.NodeName
		}
		if e.Zone != "" {
			m["zone"] = e.Zone
		}
		es = append(es, m)
	}
	return map[string]any{"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
		"metadata":    map[string]any{"name": name, "labels": map[string]any{"kubernetes.io/service-name": svc}},
		"addressType": addressType, "ports": ps, "endpoints": es}
}

// Ready is an endpoint that is ready (and serving) at addr.
func Ready(addrs ...string) Endpoint { return Endpoint{Addresses: addrs, Ready: true, Serving: true} }

// ResourceVersion is the newest resourceVersion.
func (f *API) ResourceVersion() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return strconv.Itoa(f.rv)
}
