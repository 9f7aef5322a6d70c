package discovery

import (
	"net/http"
	"net/netip"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"
)

// keyBase is a Config with every field set away from its default, so that
// changing any one of them changes what the Watcher does.
func keyBase() Config {
	return Config{
		Service:    Service{Ref: "backend.bbs:http", FQDN: "backend.bbs.svc.cluster.local.", PortName: "http", Port: 0},
		IPv4:       true,
		IPv6:       false,
		Resolver:   &Resolver{Servers: []string{"127.0.0.1:5353"}, Timeout: 3 * time.Second, UDPSize: 1400},
		RefreshMin: 2 * time.Second, RefreshMax: 7 * time.Second,
		Stale: time.Minute,
		API:   &APISource{Endpoint: "https://127.0.0.1:6443", CAFile: "/ca.crt", TokenFile: "/token"},
		Health: &HealthCheck{
			TCP: false, Method: "HEAD", URI: "/healthz", Headers: http.Header{"Host": {"app"}}, Port: 9000,
			Status: 204, Body: regexp.MustCompile("ok"), Interval: 3 * time.Second, Jitter: 100 * time.Millisecond,
			Timeout: time.Second, Passes: 2, Fails: 3, MaxInFlight: 4, Optimistic: false, FailFast: false,
			SlowStart: time.Minute, TLS: &ProbeTLS{ServerName: "app", RootCAs: []byte("-----BEGIN CERTIFICATE-----")},
		},
	}
}

// keyExempt are the fields that must not part a Watcher, and why.
var keyExempt = map[string]string{
	"Service.Ref": "how the user wrote the name, not what is asked (admin shows the first one)",
}

// Two Configs that differ in any field (but the exempt ones) must not share
// a Watcher. The fields are found by reflection, so a field added to Config,
// Resolver, Service or HealthCheck without a place in Key fails here.
func TestConfigKeyCoversEveryField(t *testing.T) {
	base := keyBase().Key()
	if again := keyBase().Key(); again != base {
		t.Fatalf("Key is not stable:\n%s\n%s", base, again)
	}
	paths := fieldPaths(reflect.TypeOf(Config{}), "", nil)
	if len(paths) < 25 {
		t.Fatalf("found only %d fields: %v", len(paths), paths)
	}
	for _, p := range paths {
		cfg := keyBase()
		leaf := reflect.ValueOf(&cfg).Elem()
		for _, i := range p.index {
			if leaf.Kind() == reflect.Pointer {
				leaf = leaf.Elem()
			}
			leaf = leaf.Field(i)
		}
		if !vary(leaf) {
			t.Errorf("%s: do not know how to change a %s; teach vary, or add it to keyExempt with a reason", p.name, leaf.Type())
			continue
		}
		_, exempt := keyExempt[p.name]
		switch changed := cfg.Key() != base; {
		case exempt && changed:
			t.Errorf("%s changes the key, but is exempt (%s)", p.name, keyExempt[p.name])
		case !exempt && !changed:
			t.Errorf("%s is missing from Config.Key: two Configs differing only there would share one Watcher", p.name)
		}
	}
}

type fieldPath struct {
	name  string
	index []int
}

// fieldPaths lists the exported leaf fields of t, descending into structs and
// pointers to structs of this package.
func fieldPaths(t reflect.Type, prefix string, index []int) []fieldPath {
	var out []fieldPath
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name := prefix + f.Name
		idx := append(append([]int(nil), index...), i)
		ft := f.Type
		if ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		if ft.Kind() == reflect.Struct && ft.PkgPath() == reflect.TypeOf(Config{}).PkgPath() {
			out = append(out, fieldPaths(ft, name+".", idx)...)
			continue
		}
		out = append(out, fieldPath{name, idx})
	}
	return out
}

// vary changes v to another value of its type; false if it cannot.
func vary(v reflect.Value) bool {
	switch {
	case v.Type() == reflect.TypeOf((*regexp.Regexp)(nil)):
		v.Set(reflect.ValueOf(regexp.MustCompile("other")))
	case v.Type() == reflect.TypeOf([]byte(nil)):
		v.Set(reflect.Append(v, reflect.ValueOf(byte('x'))))
	case v.Type() == reflect.TypeOf([]netip.Prefix{}):
		v.Set(reflect.Append(v, reflect.ValueOf(netip.MustParsePrefix("10.0.0.0/8"))))
	case v.Type() == reflect.TypeOf(http.Header{}):
		v.Set(reflect.ValueOf(http.Header{"Host": {"app"}, "X-Other": {"1"}}))
	case v.Kind() == reflect.Bool:
		v.SetBool(!v.Bool())
	case v.CanInt():
		v.SetInt(v.Int() + 1)
	case v.CanUint():
		v.SetUint(v.Uint() + 1)
	case v.Kind() == reflect.String:
		v.SetString(v.String() + "x")
	case v.Kind() == reflect.Slice && v.Type().Elem().Kind() == reflect.String:
		v.Set(reflect.Append(v, reflect.ValueOf("127.0.0.2:53")))
	default:
		return false
	}
	return true
}

// Spelled-out defaults and left-out ones ask the same question the same way.
func TestConfigKeyDefaults(t *testing.T) {
	svc := Service{FQDN: "app.bbs.svc.cluster.local.", Port: 8080}
	implicit := Config{Service: svc, IPv4: true, Resolver: &Resolver{Servers: []string{"127.0.0.1:53"}}, Health: &HealthCheck{}}
	explicit := Config{Service: svc, IPv4: true,
		Resolver:   &Resolver{Servers: []string{"127.0.0.1:53"}, Timeout: DefaultTimeout, UDPSize: DefaultUDPSize},
		RefreshMin: DefaultRefresh, RefreshMax: DefaultRefresh,
		Health: &HealthCheck{Method: http.MethodGet, URI: "/", Interval: DefaultHealthInterval, Jitter: DefaultHealthInterval / 10,
			Timeout: DefaultHealthTimeout, Passes: 1, Fails: 1, MaxInFlight: DefaultHealthMaxInFlight}}
	if a, b := implicit.Key(), explicit.Key(); a != b {
		t.Fatalf("defaults left out and spelled out differ:\n%s\n%s", a, b)
	}
	if !strings.Contains(implicit.Key(), "refresh=1s-1s") {
		t.Fatalf("key %s: want the default refresh in it", implicit.Key())
	}
	if implicit.Resolver.Timeout != 0 || implicit.Health.Method != "" {
		t.Fatal("Key changed the Config it was asked about")
	}
}

// Stats.Add adds every counter: summed Stats are how the metrics show the
// watchers sharing one service label.
func TestStatsAddCoversEveryField(t *testing.T) {
	one := NewStats()
	v := reflect.ValueOf(&one).Elem()
	for i := range v.NumField() {
		switch f := v.Field(i); f.Kind() {
		case reflect.Map:
			for _, o := range outcomes {
				one.Lookups[o] = 1
			}
		case reflect.Slice:
			for j := range f.Len() {
				f.Index(j).SetUint(1)
			}
		case reflect.Uint64:
			f.SetUint(1)
		default:
			f.SetInt(1)
		}
	}
	sum := NewStats()
	sum.Add(one)
	sum.Add(one)
	s := reflect.ValueOf(sum)
	for i := range s.NumField() {
		name := s.Type().Field(i).Name
		switch f := s.Field(i); f.Kind() {
		case reflect.Map:
			for _, o := range outcomes {
				if sum.Lookups[o] != 2 {
					t.Errorf("%s[%s] = %d, want 2", name, o, sum.Lookups[o])
				}
			}
		case reflect.Slice:
			for j := range f.Len() {
				if f.Index(j).Uint() != 2 {
					t.Errorf("%s[%d] = %d, want 2", name, j, f.Index(j).Uint())
				}
			}
		case reflect.Uint64:
			if f.Uint() != 2 {
				t.Errorf("%s = %d, want 2", name, f.Uint())
			}
		default:
			if f.Int() != 2 {
				t.Errorf("%s = %d, want 2", name, f.Int())
			}
		}
	}
}
