package caddymodule

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"

	"github.com/caddy-headless/caddy-headless/discovery"
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
		if cfg.Resolver.Timeout <= 0 || cfg.Resolver.UDPSize < 512 || cfg.Resolver.UDPSize > 65535 || len(cfg.Resolver.Servers) == 0 {
			t.Fatalf("accepted resolver is not usable: %+v", cfg.Resolver)
		}
		for _, s := range cfg.Resolver.Servers {
			if n, err := discovery.NormalizeServer(s); err != nil || n != s {
				t.Fatalf("accepted resolver %q is not in host:port form (%q, %v)", s, n, err)
			}
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

// fuzzOptionLines are the option lines FuzzRepeatedOptions picks from: list
// options, single-value options (good and bad values), flags, a block.
var fuzzOptionLines = []string{
	"resolvers 127.0.0.1:53",
	"resolvers [::1]:53 127.0.0.2",
	"allow_addresses loopback",
	"allow_addresses link_local",
	"allow_cidrs 10.0.0.0/8",
	"allow_cidrs fd00::/8 192.168.0.0/16",
	"health_headers {\n\t\tX-A 1\n\t}",
	"refresh 1s",
	"refresh 1s 30s",
	"refresh 1ns",
	"refresh 1s 0",
	"stale 5m",
	"dial_timeout 1ns",
	"dial_timeout 2s",
	"namespace bbs",
	"namespace other",
	"versions ipv4",
	"versions ipv6",
	"candidates 3",
	"edns_buffer_size 511",
	"health_uri /healthz",
	"health_interval 1ns",
	"health_interval 5s",
	"health_fail_fast",
	"health_tls",
	"slow_start 10s",
}

// FuzzRepeatedOptions parses `dynamic headless` blocks made of the lines
// above, in any order and any number of times. A single-value option given
// twice is refused; list options add up, in order; an error points at an
// option's line, never at the block's closing brace.
func FuzzRepeatedOptions(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 6})
	f.Add([]byte{7, 0, 7})
	f.Add([]byte{25, 20})
	f.Add([]byte{0, 9, 11, 20, 21})
	f.Add([]byte{2, 3, 2, 14, 15})
	f.Fuzz(func(t *testing.T, picks []byte) {
		if len(picks) > 12 {
			picks = picks[:12]
		}
		var b strings.Builder
		b.WriteString("headless x:80 {\n")
		var lists = map[string][]string{}
		names := map[string]int{}
		repeated := false
		for _, p := range picks {
			line := fuzzOptionLines[int(p)%len(fuzzOptionLines)]
			b.WriteString("\t" + line + "\n")
			name, args, _ := strings.Cut(line, " ")
			names[name]++
			if listOptions[name] {
				if name != "health_headers" {
					lists[name] = append(lists[name], strings.Fields(args)...)
				}
			} else if names[name] > 1 {
				repeated = true
			}
		}
		b.WriteString("}")
		input := b.String()
		closing := strings.Count(input, "\n") + 1
		tokens, err := caddyfile.Tokenize([]byte(input), "Caddyfile")
		if err != nil {
			t.Fatal(err)
		}
		h := new(Headless)
		err = h.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens))
		if repeated && err == nil {
			t.Fatalf("a single-value option given twice was accepted:\n%s", input)
		}
		if err != nil {
			if !strings.Contains(err.Error(), ", at Caddyfile:") || strings.HasSuffix(err.Error(), fmt.Sprintf("at Caddyfile:%d", closing)) {
				t.Fatalf("error does not point at an option's line: %v\n%s", err, input)
			}
			return
		}
		for name, got := range map[string][]string{"resolvers": h.Resolvers, "allow_addresses": h.AllowAddresses, "allow_cidrs": h.AllowCIDRs} {
			if !slices.Equal(got, lists[name]) {
				t.Fatalf("%s = %q, want every value in order %q:\n%s", name, got, lists[name], input)
			}
		}
		if _, err := h.config(caddyfileEnv); err != nil {
			t.Fatalf("accepted a block that provisioning refuses: %v\n%s", err, input)
		}
	})
}
