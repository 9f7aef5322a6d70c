package kubestore

import (
	"regexp"
	"strings"
	"testing"
)

var dnsSubdomain = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)

var labelValue = regexp.MustCompile(`^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$`)

// FuzzObjectName: every key and lock name maps to a valid object name and
// valid labels, and two different keys never map to one name.
func FuzzObjectName(f *testing.F) {
	for _, s := range []string{"a/b", "a.b", "a-b", "*.example.com", "issue_cert_*.example.com", "", "é/ü", strings.Repeat("x/", 40)} {
		f.Add(s, s+"x")
	}
	// Pairs whose readable parts are the same (a lossy mapping would merge
	// them) and a key far over the name limit.
	f.Add("a/b", "a.b")
	f.Add("a.b", "a-b")
	f.Add("certificates/x/*.example.com", "certificates/x/_.example.com")
	f.Add(strings.Repeat("k", 300), strings.Repeat("k", 301))
	f.Fuzz(func(t *testing.T, k1, k2 string) {
		for _, kind := range []string{"key", "lock"} {
			n1, n2 := objectName("caddy", kind, k1), objectName("caddy", kind, k2)
			for _, n := range []string{n1, n2} {
				if len(n) > 253 || !dnsSubdomain.MatchString(n) {
					t.Fatalf("objectName(%q) = %q: not a valid object name", k1, n)
				}
			}
			if k1 != k2 && n1 == n2 {
				t.Fatalf("keys %q and %q share the object %s", k1, k2, n1)
			}
		}
		if checkKey(k1) != nil {
			return
		}
		for k, v := range keyLabels("caddy", k1) {
			name := k[strings.IndexByte(k, '/')+1:]
			if len(k) > 253 || len(name) > 63 || len(v) > 63 || !labelValue.MatchString(v) || !labelValue.MatchString(name) {
				t.Fatalf("key %q: invalid label %s=%s", k1, k, v)
			}
		}
	})
}

func TestPrefixesNeverShareObjects(t *testing.T) {
	// "caddy" with key "a-x" and "caddy-a" with key "x" have the same
	// readable name; the hash covers the prefix, so the names differ.
	if objectName("caddy", "key", "a-x") == objectName("caddy-a", "key", "x") {
		t.Fatal("two fleets share a Secret")
	}
	if objectName("caddy", "key", "n") == objectName("caddy", "lock", "n") {
		t.Fatal("a key and a lock of the same name share an object name")
	}
}
