package caddymodule

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// TestCaddyfileProvisionErrors reads testdata/caddyfile_provision/*.caddyfiletest:
// a Caddyfile that adapts, a "----------" line, and the error that Caddy's
// validation (what `caddy validate` and a load do: provision every module)
// must fail with. For what only provisioning can see, such as the lb_policy
// beside a `dynamic headless` source. The configs name a loopback resolver,
// and validating asks no DNS.
func TestCaddyfileProvisionErrors(t *testing.T) {
	eachGolden(t, "testdata/caddyfile_provision", func(t *testing.T, file, _, input, want string) {
		out, err := adaptCaddyfile(input)
		if err != nil {
			t.Fatalf("adapt: %v", err)
		}
		var cfg caddy.Config
		if err := json.Unmarshal([]byte(out), &cfg); err != nil {
			t.Fatal(err)
		}
		err = caddy.Validate(&cfg)
		if err == nil {
			t.Fatalf("validated without error, want %q", want)
		}
		if *updateGolden {
			writeGolden(t, file, input, err.Error())
			return
		}
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("error\n  got:  %s\n  want: %s", err, want)
		}
	})
}
