// Package caddyheadless registers the caddy-headless modules with Caddy:
//
//	xcaddy build --with github.com/caddy-headless/caddy-headless
//
// The modules live in package caddymodule; the DNS discovery core they use is in
// discovery.
package caddyheadless

import (
	// Register the modules.
	_ "github.com/caddy-headless/caddy-headless/caddymodule"
)
