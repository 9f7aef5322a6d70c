package kubestore_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/caddy-headless/caddy-headless/kubestore"
	"github.com/caddy-headless/caddy-headless/kubestore/kubetest"
)

// BenchmarkStorage measures Store and Load of a certificate-sized value on
// the in-process fake apiserver, next to the baseline of the same
// transport doing a bare GET of the Secret (what no client can avoid): the
// ratio is the storage's own cost. Requests per operation are reported too.
func BenchmarkStorage(b *testing.B) {
	f := kubetest.New(b, "caddy")
	defer f.Close()
	cfg := f.Config("caddy")
	cfg.Prefix, cfg.Identity = "bench", "bench"
	s, err := kubestore.New(cfg, nil)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	key := "certificates/acme-v02.api.letsencrypt.org-directory/example.com/example.com.crt"
	value := []byte(strings.Repeat("x", 3000)) // a PEM chain
	if err := s.Store(ctx, key, value); err != nil {
		b.Fatal(err)
	}
	perOp := func(b *testing.B, before int) {
		b.ReportMetric(float64(len(f.Requests())-before)/float64(b.N), "requests/op")
	}
	b.Run("op=baseline-get", func(b *testing.B) {
		pem, _ := os.ReadFile(cfg.CAFile)
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		tok, _ := os.ReadFile(cfg.TokenFile)
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}}
		names := f.SecretNames("caddy")
		url := cfg.Endpoint + "/api/v1/namespaces/caddy/secrets/" + names[0]
		n := len(f.Requests())
		b.ResetTimer()
		for range b.N {
			req, _ := http.NewRequest(http.MethodGet, url, nil)
			req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
			resp, err := c.Do(req)
			if err != nil {
				b.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		perOp(b, n)
	})
	b.Run("op=load", func(b *testing.B) {
		n := len(f.Requests())
		for range b.N {
			if _, err := s.Load(ctx, key); err != nil {
				b.Fatal(err)
			}
		}
		perOp(b, n)
	})
	b.Run("op=store", func(b *testing.B) {
		n := len(f.Requests())
		for range b.N {
			if err := s.Store(ctx, key, value); err != nil {
				b.Fatal(err)
			}
		}
		perOp(b, n)
	})
	b.Run("op=lock-unlock", func(b *testing.B) {
		n := len(f.Requests())
		for range b.N {
			if err := s.Lock(ctx, "issue_cert_example.com"); err != nil {
				b.Fatal(err)
			}
			if err := s.Unlock(ctx, "issue_cert_example.com"); err != nil {
				b.Fatal(err)
			}
		}
		perOp(b, n)
	})
}
