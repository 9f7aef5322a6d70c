package discovery

import (
	"strings"
	"testing"
)

// Config.Validate owns the rules on a Config's values: the EDNS buffer
// range, the resolvers' form and the expected status range are checked here
// and nowhere else (the Caddyfile and JSON layers hand the values over as
// written), so each of these must be refused by the core itself.
func TestValidateOwnsValueRules(t *testing.T) {
	svc, err := ParseService("web.bbs:80", Defaults{})
	if err != nil {
		t.Fatal(err)
	}
	base := func(tune func(*Config)) Config {
		c := Config{Service: svc, IPv4: true, Resolver: &Resolver{Servers: []string{"127.0.0.1"}}}
		tune(&c)
		return c
	}
	for _, tc := range []struct {
		name string
		tune func(*Config)
		want string // "" means valid
	}{
		{"edns default", func(c *Config) {}, ""},
		{"edns 512", func(c *Config) { c.Resolver.UDPSize = 512 }, ""},
		{"edns 65535", func(c *Config) { c.Resolver.UDPSize = 65535 }, ""},
		{"edns 511", func(c *Config) { c.Resolver.UDPSize = 511 }, "edns_buffer_size must be in 512-65535, got 511"},
		{"edns 65536", func(c *Config) { c.Resolver.UDPSize = 65536 }, "edns_buffer_size must be in 512-65535, got 65536"},
		{"edns negative", func(c *Config) { c.Resolver.UDPSize = -1 }, "edns_buffer_size must be in 512-65535, got -1"},
		{"resolver host", func(c *Config) { c.Resolver.Servers = []string{"dns.example", "[::1]:5353"} }, ""},
		{"resolver space", func(c *Config) { c.Resolver.Servers = []string{"a b"} }, `resolvers: resolver "a b"`},
		{"resolver ambiguous", func(c *Config) { c.Resolver.Servers = []string{"::1:53"} }, "ambiguous"},
		{"status code", func(c *Config) { c.Health = &HealthCheck{Status: 204} }, ""},
		{"status class", func(c *Config) { c.Health = &HealthCheck{Status: 3} }, ""},
		{"status 600", func(c *Config) { c.Health = &HealthCheck{Status: 600} }, "expect_status 600"},
		{"status 99", func(c *Config) { c.Health = &HealthCheck{Status: 99} }, "expect_status 99"},
		{"status class 6", func(c *Config) { c.Health = &HealthCheck{Status: 6} }, "expect_status 6"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := base(tc.tune).Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("Validate: %v; want valid", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("Validate: %v; want an error with %q", err, tc.want)
			}
		})
	}
}

// WithDefaults puts the resolvers in NormalizeServer's form (so that equal
// questions share a Key), and leaves one it cannot for Validate to refuse.
func TestWithDefaultsNormalizesResolvers(t *testing.T) {
	c := Config{Resolver: &Resolver{Servers: []string{"10.0.0.1", "[fd00::1]:5353", "dns.example", "a b"}}}
	got := strings.Join(c.WithDefaults().Resolver.Servers, " ")
	if want := "10.0.0.1:53 [fd00::1]:5353 dns.example:53 a b"; got != want {
		t.Fatalf("servers %q, want %q", got, want)
	}
	if c.Resolver.Servers[0] != "10.0.0.1" {
		t.Fatalf("WithDefaults changed the caller's Resolver: %v", c.Resolver.Servers)
	}
	a := Config{Resolver: &Resolver{Servers: []string{"10.0.0.1"}}}
	b := Config{Resolver: &Resolver{Servers: []string{"10.0.0.1:53"}}}
	if a.Key() != b.Key() {
		t.Fatalf("10.0.0.1 and 10.0.0.1:53 ask the same question, keys differ:\n%s\n%s", a.Key(), b.Key())
	}
}
