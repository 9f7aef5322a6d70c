package integration

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The image's settings a container runtime reads from its config.
type imageConfig struct {
	Config struct {
		User       string   `json:"User"`
		Env        []string `json:"Env"`
		Entrypoint []string `json:"Entrypoint"`
	} `json:"config"`
}

// imageRootfs builds the image with xcaddy/image.sh (bin/image, rebuilt
// only what is stale) and unpacks its only layer into a directory, with the
// owners and modes of the layer, checking every blob's digest on the way.
func (s *suite) imageRootfs(t *testing.T) (root string, cfg imageConfig) {
	t.Helper()
	repo, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if out, err := run(filepath.Join(repo, "xcaddy", "image.sh")); err != nil {
		t.Fatalf("make image: %v", err)
	} else {
		t.Logf("image built in %v: %s", time.Since(t0).Round(time.Second), strings.TrimSpace(lastLine(out)))
	}
	layout := filepath.Join(repo, "bin", "image")
	blob := func(digest string) []byte {
		t.Helper()
		hexSum, ok := strings.CutPrefix(digest, "sha256:")
		if !ok {
			t.Fatalf("digest %q is not sha256", digest)
		}
		b, err := os.ReadFile(filepath.Join(layout, "blobs", "sha256", hexSum))
		if err != nil {
			t.Fatal(err)
		}
		if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != hexSum {
			t.Fatalf("blob %s has digest sha256:%x", digest, sum)
		}
		return b
	}
	type descriptor struct {
		MediaType string `json:"mediaType"`
		Digest    string `json:"digest"`
	}
	var index struct {
		Manifests []descriptor `json:"manifests"`
	}
	b, err := os.ReadFile(filepath.Join(layout, "index.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &index); err != nil || len(index.Manifests) != 1 {
		t.Fatalf("%s/index.json: %v, %d manifests", layout, err, len(index.Manifests))
	}
	var manifest struct {
		Config descriptor   `json:"config"`
		Layers []descriptor `json:"layers"`
	}
	if err := json.Unmarshal(blob(index.Manifests[0].Digest), &manifest); err != nil || len(manifest.Layers) != 1 {
		t.Fatalf("image manifest: %v, %d layers", err, len(manifest.Layers))
	}
	if err := json.Unmarshal(blob(manifest.Config.Digest), &cfg); err != nil {
		t.Fatal(err)
	}
	if l := manifest.Layers[0]; l.MediaType != "application/vnd.oci.image.layer.v1.tar+gzip" {
		t.Fatalf("layer media type %s", l.MediaType)
	}
	zr, err := gzip.NewReader(strings.NewReader(string(blob(manifest.Layers[0].Digest))))
	if err != nil {
		t.Fatal(err)
	}
	root = filepath.Join(t.TempDir(), "rootfs")
	tr := tar.NewReader(zr)
	var dirs []*tar.Header
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(root, filepath.FromSlash(h.Name))
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
			dirs = append(dirs, h)
			continue
		case tar.TypeReg:
			f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, h.FileInfo().Mode().Perm())
			if err != nil {
				t.Fatal(err)
			}
			_, err = io.Copy(f, tr)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("layer entry %s of type %c", h.Name, h.Typeflag)
		}
		if err := os.Lchown(p, h.Uid, h.Gid); err != nil {
			t.Fatal(err)
		}
	}
	for _, h := range dirs {
		p := filepath.Join(root, filepath.FromSlash(h.Name))
		if err := os.Chmod(p, h.FileInfo().Mode()&(os.ModePerm|os.ModeSticky)); err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(p, h.Uid, h.Gid); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	return root, cfg
}

// pod is one "pod" of the Deployment: the image's entrypoint in a chroot
// of the image's root filesystem.
type pod struct {
	name, addr         string
	proc               *process
	root, cmDir, saDir string
	cfg                imageConfig
	env                []string
}

// podArgs are the arguments of unshare(1) that run argv in the pod's
// filesystem as the image's user, with the image's and the pod's
// environment only.
func podArgs(t *testing.T, root, cmDir, saDir string, cfg imageConfig, env, argv []string) []string {
	t.Helper()
	chroot, err := exec.LookPath("chroot")
	if err != nil {
		t.Fatal(err)
	}
	script := `set -e
r=$1 cm=$2 sa=$3; shift 3
mount --bind "$r" "$r"
mount -o remount,bind,ro "$r"
mount --bind "$cm" "$r/etc/caddy"
mount -o remount,bind,ro "$r/etc/caddy"
mount --bind "$sa" "$r/var/run/secrets/kubernetes.io/serviceaccount"
mount -o remount,bind,ro "$r/var/run/secrets/kubernetes.io/serviceaccount"
for d in data config; do mount -t tmpfs -o uid=65532,gid=65532,mode=0755,size=64m tmpfs "$r/$d"; done
mount -t tmpfs -o mode=1777,size=64m tmpfs "$r/tmp"
mount -t proc proc "$r/proc"
exec env -i "$@"`
	args := []string{"--mount", "--propagation", "private", "sh", "-c", script, "sh", root, cmDir, saDir}
	args = append(args, cfg.Config.Env...)
	args = append(args, env...)
	args = append(args, chroot, "--userspec="+cfg.Config.User, root)
	return append(args, argv...)
}

// exec runs a command in the pod's filesystem and environment, as
// `kubectl exec` would (the mounts are the same, made anew).
func (p *pod) exec(t *testing.T, argv ...string) (string, error) {
	t.Helper()
	return run("unshare", podArgs(t, p.root, p.cmDir, p.saDir, p.cfg, p.env, argv)...)
}

// startPod runs the image as the kubelet would run the Deployment's pod,
// as far as one machine without a container runtime can: a private mount
// namespace; the image's root filesystem (hard-linked, to give the pod its
// own mount points) bind-mounted read-only; the ConfigMap's files at
// /etc/caddy and the service account's token, ca.crt and namespace at
// /var/run/secrets/kubernetes.io/serviceaccount, both read-only; tmpfs
// (emptyDir) at /data, /config and /tmp; uid and gid 65532; the image's
// environment plus the pod's (nothing of the test's). It shares the host's
// network: each pod gets its own loopback address instead.
func (s *suite) startPod(t *testing.T, image string, cfg imageConfig, cmDir, saDir, name, addr string, env []string) *pod {
	t.Helper()
	root := filepath.Join(s.dir, "pods", name)
	if err := os.MkdirAll(filepath.Dir(root), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "-al", image, root).CombinedOutput(); err != nil {
		t.Fatalf("cp -al: %v\n%s", err, out)
	}
	// Mount points the container runtime would make.
	for _, d := range []string{"proc", "var/run/secrets/kubernetes.io/serviceaccount"} {
		if err := os.MkdirAll(filepath.Join(root, filepath.FromSlash(d)), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	args := podArgs(t, root, cmDir, saDir, cfg, env, cfg.Config.Entrypoint)
	p, err := startProcess(s.dir, name, nil, "unshare", args...)
	if err != nil {
		t.Fatal(err)
	}
	pd := &pod{name: name, addr: addr, proc: p, root: root, cmDir: cmDir, saDir: saDir, cfg: cfg, env: env}
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("----- %s log (%s), last lines -----\n%s", name, p.log, p.tail(40))
		}
	})
	return pd
}

// health asks the pod's health site, as the kubelet's probes do.
func (p *pod) health(path string) (int, error) {
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(fmt.Sprintf("http://%s/%s", net.JoinHostPort(p.addr, "8081"), path))
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// client is an HTTPS client of the site through this pod only.
func (s *suite) podClient(p *pod) *http.Client {
	addr := net.JoinHostPort(p.addr, fmt.Sprint(s.httpsPort))
	d := &net.Dialer{Timeout: 5 * time.Second}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		},
		ForceAttemptHTTP2: true,
		TLSClientConfig:   &tls.Config{ServerName: site, RootCAs: s.pebbleRoots},
	}}
}

// TestDeployPods runs the image's own binary as the three pods of the
// example overlay's Deployment, with the ConfigMap as the API server holds
// it and the ServiceAccount's token: they share one certificate from the
// ACME CA through Secrets and Leases, each serves the site and its health
// site, and SIGTERM takes one out the way Kubernetes needs: /ready fails
// while it still serves, the request in flight completes, then it exits.
func TestDeployPods(t *testing.T) {
	s := requireSuite(t)
	image, cfg := s.imageRootfs(t)
	s.kubectl(t, "apply", "-k", deployDir("overlays/example"))

	// The story's backends, as in TestStory.
	ui, api := s.storyBackends(t)

	// The ConfigMap the Deployment mounts, as the kubelet would mount it.
	var d deploymentObj
	s.getJSON(t, &d, "deployment", "caddy")
	var cmName string
	for _, v := range d.Spec.Template.Spec.Volumes {
		if v.ConfigMap != nil {
			cmName = v.ConfigMap.Name
		}
	}
	var cm struct {
		Data map[string]string `json:"data"`
	}
	s.getJSON(t, &cm, "configmap", cmName)
	cmDir, _ := s.adaptConfigMap(t, cm.Data)
	if err := os.Chmod(cmDir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The service account's projected volume.
	saDir := filepath.Join(t.TempDir(), "serviceaccount")
	if err := os.Mkdir(saDir, 0o755); err != nil {
		t.Fatal(err)
	}
	_, token := s.saKubeconfig(t)
	for name, body := range map[string][]byte{"token": []byte(token), "ca.crt": s.ca.pem, "namespace": []byte(deployNS)} {
		if err := os.WriteFile(filepath.Join(saDir, name), body, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	u, err := url.Parse(s.apiURL)
	if err != nil {
		t.Fatal(err)
	}

	// Pebble validates HTTP-01 at the address CoreDNS gives for the site,
	// 127.0.0.1, on the suite's HTTP port: the first pod is there, so the
	// CA's request reaches it whichever pod ordered the certificate.
	addrs := []string{"127.0.0.1", "127.0.0.12", "127.0.0.13"}
	var pods []*pod
	for i, addr := range addrs {
		adminPort, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		name := fmt.Sprintf("caddy-%d", i)
		env := []string{
			"POD_NAME=" + name,
			"KUBERNETES_SERVICE_HOST=" + u.Hostname(),
			"KUBERNETES_SERVICE_PORT=" + u.Port(),
			// Every pod has its own loopback; these share one, so the
			// admin API gets the pod's address.
			fmt.Sprintf("CADDY_ADMIN=%s:%d", addr, adminPort),
			// The test's CA, DNS and ports (Caddyfile.example and the
			// base's Caddyfile read these; unset in a real cluster).
			"HEADLESS_OPTIONS=" + s.headlessOpts(),
			fmt.Sprintf(`CADDY_GLOBAL_OPTIONS=default_bind %s
	http_port %d
	https_port %d
	acme_ca %s
	acme_ca_root /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
	email e2e@%s`, addr, s.httpPort, s.httpsPort, s.acmeDirectory(), site),
		}
		pods = append(pods, s.startPod(t, image, cfg, cmDir, saDir, name, addr, env))
	}

	// Every pod: live, ready, serving the site with a certificate from the
	// CA, routed by path to the story's backends.
	serials := map[string]string{}
	for _, p := range pods {
		if err := waitFor(30*time.Second, 100*time.Millisecond, func() error {
			if p.proc.exited() {
				return fmt.Errorf("%s exited: %v", p.name, p.proc.Err())
			}
			for _, path := range []string{"live", "ready"} {
				if code, err := p.health(path); err != nil || code != http.StatusOK {
					return fmt.Errorf("/%s: %d %v", path, code, err)
				}
			}
			return nil
		}); err != nil {
			t.Fatalf("%s's health site: %v", p.name, err)
		}
		cl := s.podClient(p)
		var r response
		if err := waitFor(90*time.Second, 250*time.Millisecond, func() error {
			if p.proc.exited() {
				return fmt.Errorf("%s exited: %v", p.name, p.proc.Err())
			}
			var err error
			r, err = s.get(cl, "/")
			return err
		}); err != nil {
			t.Fatalf("%s does not serve https://%s/: %v", p.name, site, err)
		}
		if err := s.pebbleIssued(r.tls); err != nil {
			t.Fatalf("%s: certificate for %s does not chain to Pebble's root: %v", p.name, site, err)
		}
		serials[p.name] = r.tls.PeerCertificates[0].SerialNumber.String()
		for path, vm := range map[string]*vm{"/": ui, "/index.html": ui, "/api/items": api, "/signin": api} {
			got := s.mustGet(t, cl, path)
			if got.VM != vm.name {
				t.Errorf("%s: GET %s answered by %s, want %s", p.name, path, got.VM, vm.name)
			}
		}
	}
	if serials["caddy-0"] != serials["caddy-1"] || serials["caddy-0"] != serials["caddy-2"] {
		t.Errorf("the pods serve different certificates (serials %v): want one, shared through the Secrets", serials)
	}
	obtained := 0
	for _, p := range pods {
		n := len(logLinesOf(p.proc.log, "certificate obtained successfully", site))
		if n > 0 {
			t.Logf("%s obtained the certificate (serial %s); the others loaded it from the Secrets", p.name, serials[p.name])
		}
		obtained += n
	}
	if obtained != 1 {
		t.Errorf("%d pods' logs say they obtained a certificate for %s: want exactly one order for three replicas", obtained, site)
	}
	// deploy/README.md's reload without a rollout, in the first pod.
	if out, err := pods[0].exec(t, "caddy", "reload", "--config", "/etc/caddy/Caddyfile", "--force"); err != nil {
		t.Errorf("caddy reload in %s: %v\n%s", pods[0].name, err, out)
	}
	if got := s.mustGet(t, s.podClient(pods[0]), "/"); got.VM != ui.name {
		t.Errorf("%s after caddy reload: answered by %s", pods[0].name, got.VM)
	}
	secrets := s.kubectl(t, "-n", deployNS, "get", "secrets", "-o", "name")
	t.Logf("Secrets of the storage:\n%s", secrets)
	if !strings.Contains(secrets, "secret/caddy-") {
		t.Errorf("no Secret of the storage in %s", deployNS)
	}

	// SIGTERM to the last pod, under steady requests and with one slow
	// request in flight, as when Kubernetes deletes the pod.
	last := pods[2]
	cl := s.podClient(last)
	const slowFor = 8 * time.Second // longer than shutdown_delay (5s): it runs into the grace period
	slow := make(chan error, 1)
	var slowDone time.Time
	go func() {
		r, err := s.get(s.podClient(last), "/?sleep="+slowFor.String())
		slowDone = time.Now()
		if err == nil && (r.status != http.StatusOK || r.reply.VM != ui.name) {
			err = fmt.Errorf("%d %q", r.status, r.body)
		}
		slow <- err
	}()
	var (
		mu     sync.Mutex
		stop   = make(chan struct{})
		wg     sync.WaitGroup
		total  int
		failed []string
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			r, err := s.get(cl, "/")
			mu.Lock()
			total++
			if err != nil || r.status != http.StatusOK || r.reply.VM == "" {
				failed = append(failed, fmt.Sprintf("%s: %d %v", time.Now().Format("15:04:05.000"), r.status, err))
			}
			mu.Unlock()
			time.Sleep(20 * time.Millisecond)
		}
	}()
	time.Sleep(time.Second)
	sigterm := time.Now()
	if err := syscall.Kill(last.proc.Pid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// /ready fails while the process still runs and still serves.
	var unready time.Time
	if err := waitFor(5*time.Second, 50*time.Millisecond, func() error {
		if last.proc.exited() {
			return fmt.Errorf("%s exited before its health site failed", last.name)
		}
		code, err := last.health("ready")
		if err != nil || code != http.StatusServiceUnavailable {
			return fmt.Errorf("/ready: %d %v", code, err)
		}
		if live, err := last.health("live"); err != nil || live != http.StatusOK {
			return fmt.Errorf("/ready is 503 but /live is %d %v: the liveness probe would kill the pod", live, err)
		}
		unready = time.Now()
		return nil
	}); err != nil {
		t.Fatalf("after SIGTERM: %v", err)
	}
	t.Logf("/ready answered 503 %v after SIGTERM, %s still running", unready.Sub(sigterm).Round(time.Millisecond), last.name)
	// The endpoints controller and the load balancer need a moment to see
	// the pod go: requests keep coming for a second and must be served.
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()
	mu.Lock()
	t.Logf("%d requests through %s from 1s before SIGTERM to 1s after /ready failed; %d failed", total, last.name, len(failed))
	if len(failed) > 0 || total == 0 {
		t.Errorf("requests to %s around SIGTERM failed: %v", last.name, failed)
	}
	mu.Unlock()

	if err := <-slow; err != nil {
		t.Errorf("the request in flight at SIGTERM failed: %v", err)
	}
	select {
	case <-last.proc.Done():
	case <-time.After(40 * time.Second):
		t.Fatalf("%s still runs 40s after SIGTERM (terminationGracePeriodSeconds)", last.name)
	}
	exited := time.Now()
	if exited.Before(slowDone) {
		t.Errorf("%s exited before the request in flight completed", last.name)
	}
	if last.proc.Err() != nil {
		t.Errorf("%s exited with %v after SIGTERM, want status 0", last.name, last.proc.Err())
	}
	t.Logf("SIGTERM → /ready 503 after %v → in-flight request done after %v → exit after %v",
		unready.Sub(sigterm).Round(time.Millisecond), slowDone.Sub(sigterm).Round(time.Millisecond), exited.Sub(sigterm).Round(time.Millisecond))

	// The other pods did not notice.
	for _, p := range pods[:2] {
		if got := s.mustGet(t, s.podClient(p), "/"); got.VM != ui.name {
			t.Errorf("%s after caddy-2 stopped: answered by %s", p.name, got.VM)
		}
	}
}

// logLinesOf returns the lines of a log file that contain every substring.
func logLinesOf(path string, subs ...string) []string {
	b, _ := os.ReadFile(path)
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		ok := line != ""
		for _, sub := range subs {
			ok = ok && strings.Contains(line, sub)
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}
