package caddymodule

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"

	"github.com/caddy-headless/caddy-headless/caddymodule/discovery"
)

// fuzzSeedsDynamic are `dynamic headless` blocks, as written after `dynamic`.
var fuzzSeedsDynamic = []string{
	"headless backend.bbs:http",
	"headless frontend.bbs:8001",
	"headless frontend:8001 {\n\tnamespace bbs\n}",
	"headless web-0.web.bbs.svc.cluster.local:https {\n\tresolvers 10.96.0.10 10.96.0.11:5353 [fd00::10]:53\n}",
	"headless backend.bbs:http {\n" +
		"\tresolvers 127.0.0.1:53\n" +
		"\tnamespace bbs\n" +
		"\tcluster_domain cluster.local\n" +
		"\trefresh 1s 30s\n" +
		"\tstale 5m\n" +
		"\tversions ipv4 ipv6\n" +
		"\tdial_timeout 2s\n" +
		"\tedns_buffer_size 1232\n" +
		"}",
	"headless example.test.:443 {\n\tversions ipv6\n\trefresh 1d\n}",
	"headless",
	"headless x:80 y:80",
	"headless x:80 {\n\tbogus\n}",
	"headless x:80 {\n\tresolvers\n}",
	"headless x:80 {\n\tresolvers :53 host: [::1\n}",
	"headless x:80 {\n\tnamespace Bad_NS\n}",
	"headless x:80 {\n\tcluster_domain ..\n}",
	"headless x:80 {\n\trefresh 10s 1s\n}",
	"headless x:80 {\n\trefresh 0\n}",
	"headless x:80 {\n\trefresh 1s 2s 3s\n}",
	"headless x:80 {\n\tstale -1s\n}",
	"headless x:80 {\n\tstale 9999999999999d\n}",
	"headless x:80 {\n\tdial_timeout 0s\n}",
	"headless x:80 {\n\tversions ipv5\n}",
	"headless x:80 {\n\tedns_buffer_size 511\n}",
	"headless x:80 {\n\tedns_buffer_size 65536\n}",
	"headless x:80 {\n\tcandidates all\n}",
	"headless x:80 {\n\tcandidates 3\n}",
	"headless x:80 {\n\tcandidates -1\n}",
	"headless x:80 {\n\tcandidates 1 2\n}",
	"headless x:80 {\n\tnamespace {\n\t}\n}",
	"headless x:80 {\n\t{\n}",
	"headless x:80 {\n\tnamespace \"a b\"\n}",
	"headless `x:80` {\n\tnamespace `bbs`\n}",
	"headless x:80 {\n\tresolvers {$NOPE}\n}",
	"headless " + strings.Repeat("a", 63) + ".bbs:http {\n\tcluster_domain " + strings.Repeat("d", 63) + "." + strings.Repeat("e", 63) + "." + strings.Repeat("f", 60) + "\n}",
	"headless x:80 {\n\tnamespace bbs\n\tnamespace other\n}",
	"headless x:80 {\n\tresolvers 1.1.1.1 <<EOF\n\tEOF\n}",
}

// FuzzUnmarshalCaddyfile feeds arbitrary Caddyfile text to the `dynamic
// headless` unmarshaller. It must never panic; what it rejects must come back
// as an error that points at the Caddyfile; what it accepts must survive the
// JSON round trip Caddy puts it through, and must either provision into a
// watcher configuration or fail with an error (never a panic). Accepted input
// is also run through Caddy's own Caddyfile adapter inside a reverse_proxy.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	old := environment
	environment = discovery.Environment{
		ResolvConf:    filepath.Join(f.TempDir(), "resolv.conf"),
		NamespaceFile: filepath.Join(f.TempDir(), "namespace"),
	}
	f.Cleanup(func() { environment = old })
	for _, s := range fuzzSeedsDynamic {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		tokens, err := caddyfile.Tokenize([]byte(input), "Caddyfile")
		if err != nil {
			return // not Caddyfile syntax at all: Caddy's lexer reports it
		}
		h := new(Headless)
		err = h.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens))
		if err != nil {
			// ", at Caddyfile:<line>", or ", at :0" for input without tokens
			// (which Caddy never hands a module: it has the module's name).
			if !strings.Contains(err.Error(), ", at ") {
				t.Fatalf("error does not point at the Caddyfile: %v", err)
			}
			return
		}
		refs := []string{h.Service}
		if len(h.Services) > 0 { // several Services: a split
			refs = refs[:0]
			for _, ws := range h.Services {
				refs = append(refs, ws.Service)
			}
		}
		for _, ref := range refs {
			if _, err := discovery.ParseService(ref, discovery.Defaults{}); err != nil {
				t.Fatalf("accepted service %q does not parse: %v", ref, err)
			}
		}

		// Caddy stores the module as JSON and provisions a fresh value from it.
		b, err := json.Marshal(h)
		if err != nil {
			t.Fatalf("marshal %+v: %v", h, err)
		}
		back := new(Headless)
		if err := json.Unmarshal(b, back); err != nil {
			t.Fatalf("unmarshal %s: %v", b, err)
		}
		if !reflect.DeepEqual(h, back) {
			t.Fatalf("JSON round trip changed the config:\n%+v\n%s\n%+v", h, b, back)
		}
		// The parser checks with the same function Provision does: what it
		// accepts, Provision accepts.
		cfg, err := back.config(caddyfileEnv)
		if err != nil {
			t.Fatalf("the Caddyfile accepted what provisioning refuses: %v", err)
		}
		if cfg.RefreshMin <= 0 || cfg.RefreshMax < cfg.RefreshMin || cfg.Stale < 0 || !cfg.IPv4 && !cfg.IPv6 {
			t.Fatalf("accepted config is not usable: %+v", cfg)
		}
		if cfg.Resolver.Timeout <= 0 || cfg.Resolver.UDPSize < 512 || len(cfg.Resolver.Servers) == 0 {
			t.Fatalf("accepted resolver is not usable: %+v", cfg.Resolver)
		}

		// The same block inside a site, through Caddy's adapter: no panic.
		// (Not with imports: the fuzzer must not make Caddy read /dev/zero.)
		if strings.Contains(input, "import") {
			return
		}
		site := ":80 {\n\treverse_proxy {\n\t\tdynamic " + input + "\n\t}\n}\n"
		adapter := caddyfile.Adapter{ServerType: httpcaddyfile.ServerType{}}
		_, _, _ = adapter.Adapt([]byte(site), nil)
	})
}

// FuzzHeadlessProxy adapts arbitrary Caddyfiles, seeded with the golden files
// of the headless_proxy directive, through Caddy's own Caddyfile adapter. It
// must never panic; whatever adapts must carry headless sources whose services
// parse and provision (or fail to provision with an error), and reverse_proxy
// handlers built by the directive must not keep the scheme placeholder upstream.
func FuzzHeadlessProxy(f *testing.F) {
	old := environment
	environment = discovery.Environment{
		ResolvConf:    filepath.Join(f.TempDir(), "resolv.conf"),
		NamespaceFile: filepath.Join(f.TempDir(), "namespace"),
	}
	f.Cleanup(func() { environment = old })
	files, _ := filepath.Glob("testdata/caddyfile_adapt/*.caddyfiletest")
	for _, file := range files {
		raw, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		input, _, _ := strings.Cut(string(raw), goldenSep)
		f.Add(input)
	}
	f.Add(":80 {\n\theadless_proxy\n}")
	f.Add(":80 {\n\theadless_proxy x:80 {\n\t\ttransport http {\n\t\t\tresolvers 1.1.1.1\n\t\t}\n\t\tresolvers 10.0.0.1\n\t}\n}")
	f.Add(":80 {\n\theadless_proxy https://x:http http://y:80\n}")
	f.Add(":80 {\n\theadless_proxy x:80 {\n\t\tnamespace bbs {\n\t\t}\n\t}\n}")
	f.Add(":80 {\n\troute {\n\t\theadless_proxy /api* backend.bbs:http {\n\t\t\tlb_policy first\n\t\t\tto y:80\n\t\t}\n\t}\n}")
	f.Fuzz(func(t *testing.T, input string) {
		if strings.Contains(input, "import") {
			return // the fuzzer must not make Caddy read /dev/zero
		}
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), map[string]any{"filename": "Caddyfile"})
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		var cfg any
		if err := json.Unmarshal(out, &cfg); err != nil {
			t.Fatalf("adapted config is not JSON: %v\n%s", err, out)
		}
		// reverse_proxy and php_fastcgi may name static upstreams beside a
		// dynamic source (Caddy falls back to them when the source fails);
		// only headless_proxy's handlers must never have any.
		directiveOnly := !strings.Contains(input, "reverse_proxy") && !strings.Contains(input, "php_fastcgi")
		walkJSON(cfg, func(obj map[string]any) {
			if directiveOnly && obj["handler"] == "reverse_proxy" && obj["dynamic_upstreams"] != nil && obj["upstreams"] != nil {
				t.Fatalf("reverse_proxy with both dynamic and static upstreams: %v", obj)
			}
			if obj["source"] != "headless" {
				return
			}
			b, _ := json.Marshal(obj)
			h := new(Headless)
			if err := json.Unmarshal(b, h); err != nil {
				t.Fatalf("headless source %s does not unmarshal: %v", b, err)
			}
			refs := []string{h.Service}
			if len(h.Services) > 0 {
				refs = refs[:0]
				for _, ws := range h.Services {
					refs = append(refs, ws.Service)
				}
			}
			for _, ref := range refs {
				if _, err := discovery.ParseService(ref, discovery.Defaults{}); err != nil {
					t.Fatalf("headless source %s: service does not parse: %v", b, err)
				}
			}
			if _, err := h.configs(caddyfileEnv); err != nil {
				t.Fatalf("headless_proxy accepted a source that provisioning refuses: %s: %v", b, err)
			}
		})
	})
}

// walkJSON calls fn on every object inside v.
func walkJSON(v any, fn func(map[string]any)) {
	switch v := v.(type) {
	case map[string]any:
		fn(v)
		for _, c := range v {
			walkJSON(c, fn)
		}
	case []any:
		for _, c := range v {
			walkJSON(c, fn)
		}
	}
}
