// Package kubetest is an in-process fake of the part of the Kubernetes REST
// API that package kubestore uses, for fast unit tests. It answers the way
// kube-apiserver does; the integration suite runs the same contract tests
// (package storagetest) against the real one, which keeps the two honest.
package kubetest

import (
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-headless/caddy-headless/kubestore"
)

// API answers the part of the Kubernetes REST API the storage uses the
// way kube-apiserver does (checked against v1.37.2 by the integration
// suite, which runs the same contract tests on the real one): Status
// bodies, 409 on a stale resourceVersion or an existing name, 404 on PUT of
// a missing object (no create-on-update), 422 for invalid names and data
// over 1 MiB, delete preconditions, label selectors, limit/continue, 401
// for a wrong token and 403 outside the namespaces the token may use.
type API struct {
	t   testing.TB
	srv *httptest.Server

	tokenFile string // what the client reads
	caFile    string

	mu       sync.Mutex
	token    string          // what the server accepts
	allowed  map[string]bool // namespaces the token may use
	objects  map[string]map[string]any
	rv       int
	uid      int
	requests []string                          // "VERB resource name" of every request
	down     bool                              // answer 503 to everything
	hook     func(verb, resource, name string) // called before every request, unlocked
}

func New(t testing.TB, namespaces ...string) *API {
	t.Helper()
	f := &API{t: t, token: "token-1", allowed: map[string]bool{}, objects: map[string]map[string]any{}}
	for _, ns := range namespaces {
		f.allowed[ns] = true
	}
	f.srv = httptest.NewTLSServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	dir := t.TempDir()
	f.tokenFile = filepath.Join(dir, "token")
	f.caFile = filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(f.tokenFile, []byte(f.token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.caFile, pemOf(f.srv.Certificate().Raw), 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

// Config is a storage Config for namespace ns on this fake, with short test
// intervals.
func (f *API) Config(ns string) kubestore.Config {
	return kubestore.Config{
		Endpoint: f.srv.URL, CAFile: f.caFile, TokenFile: f.tokenFile,
		Namespace: ns, Prefix: "caddy", Identity: "replica-a",
		LeaseDuration: 2 * time.Second, RenewInterval: 200 * time.Millisecond,
		RequestTimeout: 5 * time.Second, PollInterval: 20 * time.Millisecond,
	}
}

// DNSSubdomain is the apiserver's rule for object names.
var DNSSubdomain = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)

func status(w http.ResponseWriter, code int, reason, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(map[string]any{"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": msg, "reason": reason, "code": code})
}

var pathRE = regexp.MustCompile(`^/(?:api/v1|apis/coordination\.k8s\.io/v1)/namespaces/([^/]+)/(secrets|leases)(?:/([^/]+))?$`)

func (f *API) serve(w http.ResponseWriter, r *http.Request) {
	m := pathRE.FindStringSubmatch(r.URL.Path)
	if m == nil {
		status(w, 404, "NotFound", "the server could not find the requested resource")
		return
	}
	ns, res, name := m[1], m[2], m[3]
	verb := map[string]string{"GET": "get", "POST": "create", "PUT": "update", "DELETE": "delete"}[r.Method]
	if verb == "get" && name == "" {
		verb = "list"
	}
	f.mu.Lock()
	hook := f.hook
	f.requests = append(f.requests, verb+" "+res+" "+name)
	f.mu.Unlock()
	if hook != nil {
		hook(verb, res, name)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down {
		status(w, 503, "ServiceUnavailable", "apiserver is shutting down")
		return
	}
	if r.Header.Get("Authorization") != "Bearer "+f.token {
		status(w, 401, "Unauthorized", "Unauthorized")
		return
	}
	if !f.allowed[ns] {
		status(w, 403, "Forbidden", fmt.Sprintf("%s is forbidden: User \"system:serviceaccount:caddy:caddy\" cannot %s resource %q in API group %q in the namespace %q", res, verb, res, map[string]string{"secrets": "", "leases": "coordination.k8s.io"}[res], ns))
		return
	}
	coll := res + "/" + ns
	if f.objects[coll] == nil {
		f.objects[coll] = map[string]any{}
	}
	objs := f.objects[coll]
	var body map[string]any
	if r.Body != nil {
		b, _ := io.ReadAll(r.Body)
		if len(b) > 0 && json.Unmarshal(b, &body) != nil {
			status(w, 400, "BadRequest", "invalid JSON")
			return
		}
	}
	switch verb {
	case "list":
		f.list(w, r, objs)
	case "get":
		o, ok := objs[name]
		if !ok {
			status(w, 404, "NotFound", fmt.Sprintf("%s %q not found", res, name))
			return
		}
		json.NewEncoder(w).Encode(o)
	case "create", "update":
		meta, _ := body["metadata"].(map[string]any)
		if meta == nil {
			status(w, 400, "BadRequest", "no metadata")
			return
		}
		n, _ := meta["name"].(string)
		if verb == "update" && n != name {
			status(w, 400, "BadRequest", "the name of the object does not match the name on the URL")
			return
		}
		if !DNSSubdomain.MatchString(n) || len(n) > 253 {
			status(w, 422, "Invalid", fmt.Sprintf("%s %q is invalid: metadata.name: Invalid value: %q: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'", res, n, n))
			return
		}
		if res == "secrets" {
			size := 0
			data, _ := body["data"].(map[string]any)
			for _, v := range data {
				s, _ := v.(string)
				size += len(s) * 3 / 4 // base64
				size -= strings.Count(s, "=")
			}
			if size > kubestore.MaxValueSize {
				status(w, 422, "Invalid", fmt.Sprintf("Secret %q is invalid: data: Too long: must have at most 1048576 bytes", n))
				return
			}
		}
		old, exists := objs[n]
		switch {
		case verb == "create" && exists:
			status(w, 409, "AlreadyExists", fmt.Sprintf("%s %q already exists", res, n))
			return
		case verb == "update" && !exists:
			status(w, 404, "NotFound", fmt.Sprintf("%s %q not found", res, n))
			return
		case verb == "update":
			om := old.(map[string]any)["metadata"].(map[string]any)
			if rv, _ := meta["resourceVersion"].(string); rv != "" && rv != om["resourceVersion"] {
				status(w, 409, "Conflict", fmt.Sprintf("Operation cannot be fulfilled on %s %q: the object has been modified; please apply your changes to the latest version and try again", res, n))
				return
			}
			meta["uid"] = om["uid"]
			meta["creationTimestamp"] = om["creationTimestamp"]
		default:
			if rv, _ := meta["resourceVersion"].(string); rv != "" {
				status(w, 400, "BadRequest", "resourceVersion should not be set on objects to be created")
				return
			}
			f.uid++
			meta["uid"] = fmt.Sprintf("uid-%d", f.uid)
			meta["creationTimestamp"] = time.Now().UTC().Format(time.RFC3339)
		}
		f.rv++
		meta["resourceVersion"] = strconv.Itoa(f.rv)
		meta["namespace"] = ns
		objs[n] = body
		if verb == "create" {
			w.WriteHeader(201)
		}
		json.NewEncoder(w).Encode(body)
	case "delete":
		o, ok := objs[name]
		if !ok {
			status(w, 404, "NotFound", fmt.Sprintf("%s %q not found", res, name))
			return
		}
		om := o.(map[string]any)["metadata"].(map[string]any)
		if pre, _ := body["preconditions"].(map[string]any); pre != nil {
			if uid, _ := pre["uid"].(string); uid != "" && uid != om["uid"] {
				status(w, 409, "Conflict", fmt.Sprintf("Operation cannot be fulfilled on %s %q: Precondition failed: UID in precondition: %s, UID in object meta: %s", res, name, uid, om["uid"]))
				return
			}
			if rv, _ := pre["resourceVersion"].(string); rv != "" && rv != om["resourceVersion"] {
				status(w, 409, "Conflict", fmt.Sprintf("Operation cannot be fulfilled on %s %q: Precondition failed: ResourceVersion in precondition: %s, ResourceVersion in object meta: %s", res, name, rv, om["resourceVersion"]))
				return
			}
		}
		delete(objs, name)
		json.NewEncoder(w).Encode(map[string]any{"kind": "Status", "apiVersion": "v1", "status": "Success"})
	}
}

func (f *API) list(w http.ResponseWriter, r *http.Request, objs map[string]any) {
	want := map[string]string{}
	if sel := r.URL.Query().Get("labelSelector"); sel != "" {
		for _, term := range strings.Split(sel, ",") {
			k, v, ok := strings.Cut(term, "=")
			if !ok {
				status(w, 400, "BadRequest", "unable to parse requirement: "+term)
				return
			}
			want[k] = v
		}
	}
	var names []string
	for n, o := range objs {
		labels, _ := o.(map[string]any)["metadata"].(map[string]any)["labels"].(map[string]any)
		ok := true
		for k, v := range want {
			if labels[k] != v {
				ok = false
			}
		}
		if ok {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	start, _ := strconv.Atoi(r.URL.Query().Get("continue"))
	limit, _ := strconv.Atoi(r.URL.Query().Get("limit"))
	end := len(names)
	cont := ""
	if limit > 0 && start+limit < end {
		end = start + limit
		cont = strconv.Itoa(end)
	}
	items := []any{}
	for _, n := range names[min(start, len(names)):end] {
		items = append(items, objs[n])
	}
	json.NewEncoder(w).Encode(map[string]any{"kind": "List", "apiVersion": "v1", "metadata": map[string]any{"continue": cont}, "items": items})
}

// Rotate makes the server accept only a new token; the token file changes
// only if writeFile.
func (f *API) Rotate(t testing.TB, writeFile bool) {
	f.mu.Lock()
	f.token += "x"
	tok := f.token
	f.mu.Unlock()
	if writeFile {
		if err := os.WriteFile(f.tokenFile, []byte(tok), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// SetDown makes every answer a 503 (an apiserver shutting down).
func (f *API) SetDown(d bool) {
	f.mu.Lock()
	f.down = d
	f.mu.Unlock()
}

// Close stops the server: nothing answers any more.
func (f *API) Close() { f.srv.Close() }

// Requests are "verb resource name" of every request so far.
func (f *API) Requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.requests...)
}

// SecretNames lists the Secrets in ns.
func (f *API) SecretNames(ns string) []string { return f.names("secrets/" + ns) }

// LeaseNames lists the Leases in ns.
func (f *API) LeaseNames(ns string) []string { return f.names("leases/" + ns) }

func (f *API) names(collection string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var names []string
	for n := range f.objects[collection] {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func pemOf(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// LeaseHolder is the holder of a Lease, "" if there is no such Lease.
func (f *API) LeaseHolder(ns, name string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	o, ok := f.objects["leases/"+ns][name].(map[string]any)
	if !ok {
		return ""
	}
	h, _ := o["spec"].(map[string]any)["holderIdentity"].(string)
	return h
}

// BeforeRequest makes fn run before every request is answered ("verb",
// "secrets"|"leases", object name), outside the fake's lock, so that fn
// can change objects as another replica would.
func (f *API) BeforeRequest(fn func(verb, resource, name string)) {
	f.mu.Lock()
	f.hook = fn
	f.mu.Unlock()
}

// Mutate changes a stored object as another writer would: fn edits it (nil
// fn deletes it) and it gets a new resourceVersion.
func (f *API) Mutate(ns, resource, name string, fn func(obj map[string]any)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	objs := f.objects[resource+"/"+ns]
	o, ok := objs[name].(map[string]any)
	if !ok {
		return
	}
	if fn == nil {
		delete(objs, name)
		return
	}
	fn(o)
	f.rv++
	o["metadata"].(map[string]any)["resourceVersion"] = strconv.Itoa(f.rv)
}
