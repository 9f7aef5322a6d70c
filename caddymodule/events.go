package caddymodule

import (
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"

	"github.com/caddy-headless/caddy-headless/discovery"
)

// The watchers' events become Caddy events, emitted through the events app
// of the newest config that uses the watcher, with the source as origin
// (module http.reverse_proxy.upstreams.headless):
//
//	healthy, unhealthy   {"host": "10.1.0.7:8080", "service": "web.bbs.svc.cluster.local:8080"}
//	endpoints_changed    {"service": …, "added": [ip:port…], "removed": [ip:port…], "endpoints": n}
//
// healthy and unhealthy carry the name and the `host` of Caddy's own active
// health checker, so a handler written for static upstreams keeps working.

// eventsOf returns the events app of ctx's config; nil in a bare context made
// without a config (unit tests), where ctx.App panics.
func eventsOf(ctx caddy.Context) (app *caddyevents.App) {
	defer func() {
		if recover() != nil {
			app = nil
		}
	}()
	a, err := ctx.App("events")
	if err != nil {
		return nil
	}
	app, _ = a.(*caddyevents.App)
	return app
}

// emitter emits a watcher's events through app, from the module of ctx.
func emitter(ctx caddy.Context, app *caddyevents.App) func(discovery.Event) {
	return func(ev discovery.Event) {
		data := map[string]any{"service": ev.Service.String()}
		switch ev.Name {
		case discovery.EventHealthy, discovery.EventUnhealthy:
			data["host"] = ev.Endpoint
		case discovery.EventEndpointsChanged:
			data["added"], data["removed"], data["endpoints"] = orEmpty(ev.Added), orEmpty(ev.Removed), ev.Endpoints
		}
		app.Emit(ctx, ev.Name, data)
	}
}

func orEmpty(l []string) []string {
	if l == nil {
		return []string{}
	}
	return l
}
