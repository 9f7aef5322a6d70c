//go:build tools

// Package tools pins Pebble, the ACME test CA, for the integration suite;
// build-tools.sh builds github.com/letsencrypt/pebble/v2/cmd/pebble from it.
package tools

import _ "github.com/letsencrypt/pebble/v2/cmd/pebble"
