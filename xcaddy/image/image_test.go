package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/validate"
)

// The tests of the built image need the static Caddy `make image` builds
// from; `make test-image` passes it as CADDY_BIN, and the image `make image`
// wrote as IMAGE_OCI.
func caddyBin(t *testing.T) string {
	t.Helper()
	b := os.Getenv("CADDY_BIN")
	if b == "" {
		t.Fatal("CADDY_BIN is not set: run `make test-image` (it builds bin/caddy and the image first)")
	}
	return b
}

var repoRoot = filepath.Join("..", "..")

func baseInputs(t *testing.T) inputs {
	return inputs{
		caddy:      caddyBin(t),
		caddyFiles: []string{filepath.Join(repoRoot, "deploy", "base", "Caddyfile"), filepath.Join(repoRoot, "deploy", "base", "sites.caddy")},
		caBundle:   "/etc/ssl/certs/ca-certificates.crt",
	}
}

// build runs the command into dir and returns the digest of the image in
// the layout it wrote, the layout and the tarball.
func build(t *testing.T, in inputs, dir string) (digest, oci, archive string) {
	t.Helper()
	oci, archive = filepath.Join(dir, "oci"), filepath.Join(dir, "image.tar")
	if err := run(in, oci, archive, "", "caddy-headless:dev"); err != nil {
		t.Fatal(err)
	}
	d, err := onlyImage(t, oci).Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String(), oci, archive
}

func fileHash(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", sha256.Sum256(b))
}

// Same inputs, same image: digest, layout index and tarball byte for byte;
// one changed byte of the Caddyfile, another digest.
func TestReproducible(t *testing.T) {
	in := baseInputs(t)
	d1, oci1, tar1 := build(t, in, t.TempDir())
	d2, oci2, tar2 := build(t, in, t.TempDir())
	if d1 != d2 {
		t.Fatalf("two builds from the same inputs: digests %s and %s", d1, d2)
	}
	if a, b := fileHash(t, filepath.Join(oci1, "index.json")), fileHash(t, filepath.Join(oci2, "index.json")); a != b {
		t.Errorf("index.json differs between two builds (%s, %s)", a, b)
	}
	if a, b := fileHash(t, tar1), fileHash(t, tar2); a != b {
		t.Errorf("the tarball differs between two builds (%s, %s)", a, b)
	}
	t.Logf("digest %s, twice", d1)

	// `make image` wrote bin/image from the same inputs: the same digest.
	if made := os.Getenv("IMAGE_OCI"); made != "" {
		img := onlyImage(t, made)
		d, err := img.Digest()
		if err != nil {
			t.Fatal(err)
		}
		if d.String() != d1 {
			t.Errorf("%s (make image) has digest %s; built here from the same inputs: %s", made, d, d1)
		}
	}

	changed := filepath.Join(t.TempDir(), "Caddyfile")
	b, err := os.ReadFile(in.caddyFiles[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(changed, append(b, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
	in.caddyFiles = []string{changed, in.caddyFiles[1]}
	if d3, _, _ := build(t, in, t.TempDir()); d3 == d1 {
		t.Errorf("a changed Caddyfile gave the same digest %s", d3)
	}
}

// onlyImage reads the single image of an OCI layout, validating the index,
// the manifest, the config and every layer's digests and sizes on the way.
func onlyImage(t *testing.T, dir string) v1.Image {
	t.Helper()
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Index(idx); err != nil {
		t.Fatalf("%s does not validate: %v", dir, err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 {
		t.Fatalf("%s holds %d manifests, want 1", dir, len(im.Manifests))
	}
	desc := im.Manifests[0]
	if desc.Platform == nil || desc.Platform.OS != "linux" || desc.Platform.Architecture != runtime.GOARCH {
		t.Errorf("index platform %+v, want linux/%s", desc.Platform, runtime.GOARCH)
	}
	if got := desc.Annotations["org.opencontainers.image.ref.name"]; got != "caddy-headless:dev" {
		t.Errorf("ref.name annotation %q, want caddy-headless:dev", got)
	}
	img, err := idx.Image(desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// The image's config says what the issue asks and what the Containerfile
// says; the tarball holds the same image.
func TestImageConfig(t *testing.T) {
	d, oci, archive := build(t, baseInputs(t), t.TempDir())
	img := onlyImage(t, oci)
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
		t.Errorf("config os/arch %s/%s, want linux/%s", cf.OS, cf.Architecture, runtime.GOARCH)
	}
	c := cf.Config
	if c.User != "65532:65532" {
		t.Errorf("user %q, want 65532:65532", c.User)
	}
	for _, e := range []string{"XDG_DATA_HOME=/data", "XDG_CONFIG_HOME=/config"} {
		if !slices.Contains(c.Env, e) {
			t.Errorf("env %v lacks %s", c.Env, e)
		}
	}
	if want := []string{"/usr/bin/caddy", "run", "--config", "/etc/caddy/Caddyfile"}; !reflect.DeepEqual(c.Entrypoint, want) || len(c.Cmd) != 0 {
		t.Errorf("entrypoint %q cmd %q, want %q and no cmd", c.Entrypoint, c.Cmd, want)
	}
	var ports []string
	for p := range c.ExposedPorts {
		ports = append(ports, p)
	}
	slices.Sort(ports)
	if want := []string{"443/tcp", "443/udp", "80/tcp"}; !reflect.DeepEqual(ports, want) {
		t.Errorf("exposed ports %v, want %v", ports, want)
	}
	if ls, _ := img.Layers(); len(ls) != 1 {
		t.Errorf("%d layers, want 1 on an empty base", len(ls))
	}

	// The tarball (docker-archive format, docker media types) holds the
	// same config and the same layer contents.
	ti, err := tarball.ImageFromPath(archive, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Image(ti); err != nil {
		t.Fatalf("tarball does not validate: %v", err)
	}
	tc, _ := ti.ConfigName()
	lc, _ := img.ConfigName()
	if tc != lc {
		t.Errorf("tarball config %s, layout config %s", tc, lc)
	}
	t.Logf("image %s, config %s", d, lc)
}

// TestContainerfile holds xcaddy/Containerfile to the daemonless image: its
// final stage states the same settings, and its build stage writes the root
// filesystem with this program's -rootfs, which gives the layer's files.
func TestContainerfile(t *testing.T) {
	stages := parseContainerfile(t, filepath.Join(repoRoot, "xcaddy", "Containerfile"))
	if len(stages) != 2 {
		t.Fatalf("Containerfile has %d stages, want 2 (build, scratch)", len(stages))
	}
	buildStage, final := stages[0], stages[1]
	if got := final.from; got != "scratch" {
		t.Errorf("final stage FROM %s, want scratch (no base to pull)", got)
	}
	if got := final.one(t, "USER"); got != imageUser {
		t.Errorf("USER %s, image %s", got, imageUser)
	}
	if got := strings.Fields(final.one(t, "ENV")); !reflect.DeepEqual(got, imageEnv) {
		t.Errorf("ENV %v, image %v", got, imageEnv)
	}
	if got := final.one(t, "WORKDIR"); got != imageWorkdir {
		t.Errorf("WORKDIR %s, image %s", got, imageWorkdir)
	}
	if got := strings.Fields(final.one(t, "EXPOSE")); !reflect.DeepEqual(got, imagePorts) {
		t.Errorf("EXPOSE %v, image %v", got, imagePorts)
	}
	var ep []string
	if err := json.Unmarshal([]byte(final.one(t, "ENTRYPOINT")), &ep); err != nil || !reflect.DeepEqual(ep, imageEntrypoint) {
		t.Errorf("ENTRYPOINT %s (%v), image %q", final.one(t, "ENTRYPOINT"), err, imageEntrypoint)
	}
	runs := strings.Join(buildStage.all["RUN"], "\n")
	for _, want := range []string{"CGO_ENABLED=0 ./xcaddy/build.sh /out/caddy", "go run . -caddy /out/caddy",
		"-etc-caddy ../../deploy/base/Caddyfile -etc-caddy ../../deploy/base/sites.caddy", "-rootfs /rootfs"} {
		if !strings.Contains(runs, want) {
			t.Errorf("the build stage does not run %q:\n%s", want, runs)
		}
	}

	// -rootfs writes exactly the layer's entries: paths, types, modes,
	// owners and contents.
	if os.Geteuid() != 0 {
		t.Fatal("writing a root filesystem with owners needs root")
	}
	in := baseInputs(t)
	dir := t.TempDir()
	if err := run(in, "", "", dir, "caddy-headless:dev"); err != nil {
		t.Fatal(err)
	}
	_, oci, _ := build(t, in, t.TempDir())
	layerEntries := tarEntries(t, mutate.Extract(onlyImage(t, oci)))
	dirEntries := walkEntries(t, dir)
	if !reflect.DeepEqual(layerEntries, dirEntries) {
		t.Errorf("-rootfs and the image layer differ:\nlayer: %v\nrootfs: %v", layerEntries, dirEntries)
	}
}

type stage struct {
	from string
	all  map[string][]string
}

func (s stage) one(t *testing.T, instr string) string {
	t.Helper()
	if len(s.all[instr]) != 1 {
		t.Fatalf("stage FROM %s: %d %s instructions, want 1", s.from, len(s.all[instr]), instr)
	}
	return s.all[instr][0]
}

// parseContainerfile reads instructions (continuation lines joined) per
// stage.
func parseContainerfile(t *testing.T, path string) []stage {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var stages []stage
	var cur strings.Builder
	flush := func() {
		line := strings.TrimSpace(cur.String())
		cur.Reset()
		if line == "" {
			return
		}
		instr, args, _ := strings.Cut(line, " ")
		instr = strings.ToUpper(instr)
		if instr == "FROM" {
			from := strings.Fields(args)[0]
			stages = append(stages, stage{from: from, all: map[string][]string{}})
			return
		}
		if len(stages) == 0 {
			t.Fatalf("%s: %s before FROM", path, instr)
		}
		s := stages[len(stages)-1]
		s.all[instr] = append(s.all[instr], strings.TrimSpace(args))
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		if strings.HasSuffix(line, "\\") {
			cur.WriteString(strings.TrimSuffix(line, "\\") + " ")
			continue
		}
		cur.WriteString(line)
		flush()
	}
	flush()
	return stages
}

type entry struct {
	Path string
	Mode fs.FileMode
	UID  int
	Sum  string
}

func tarEntries(t *testing.T, r io.ReadCloser) []entry {
	t.Helper()
	defer r.Close()
	tr := tar.NewReader(r)
	var out []entry
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		e := entry{Path: "/" + strings.TrimSuffix(h.Name, "/"), Mode: h.FileInfo().Mode(), UID: h.Uid}
		if h.Typeflag == tar.TypeReg {
			e.Sum = fmt.Sprintf("%x", sha256.Sum256(b))
		}
		if h.Uid != h.Gid {
			t.Errorf("%s: uid %d, gid %d", h.Name, h.Uid, h.Gid)
		}
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b entry) int { return strings.Compare(a.Path, b.Path) })
	return out
}

func walkEntries(t *testing.T, dir string) []entry {
	t.Helper()
	var out []entry
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		e := entry{Path: "/" + filepath.ToSlash(strings.TrimPrefix(p, dir+"/")), Mode: fi.Mode(), UID: int(fi.Sys().(*syscall.Stat_t).Uid)}
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			e.Sum = fmt.Sprintf("%x", sha256.Sum256(b))
		}
		out = append(out, e)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestRootfsRuns unpacks the image and runs its own binary from it the way
// a container runtime does with deployment.yaml: chroot into the read-only
// root filesystem as uid 65532 with a tmpfs /data, /config and /tmp.
func TestRootfsRuns(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("unpacking the image with its owners and chrooting into it needs root")
	}
	_, oci, _ := build(t, baseInputs(t), t.TempDir())
	root := filepath.Join(t.TempDir(), "rootfs")
	unpack(t, onlyImage(t, oci), root)

	bin := filepath.Join(root, "usr", "bin", "caddy")
	if _, err := checkBinary(bin, mustRead(t, bin)); err != nil {
		t.Fatalf("the image's binary: %v", err)
	}
	out, err := exec.Command("go", "version", "-m", bin).CombinedOutput()
	if err != nil {
		t.Fatalf("go version -m: %v\n%s", err, out)
	}
	for _, want := range []string{"\tdep\t" + pluginModule + "\t", "build\tCGO_ENABLED=0", "build\t-trimpath=true"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("go version -m of the image's caddy lacks %q:\n%s", want, out)
		}
	}
	for _, p := range []string{"/data", "/config"} {
		fi, err := os.Stat(filepath.Join(root, p))
		if err != nil || fi.Sys().(*syscall.Stat_t).Uid != uid {
			t.Errorf("%s: %v, want a directory of uid %d", p, err, uid)
		}
	}

	mods := inRootfs(t, root, "list-modules")
	for _, m := range []string{"http.reverse_proxy.upstreams.headless", "admin.api.headless", "caddy.storage.k8s"} {
		if !slices.Contains(strings.Fields(mods), m) {
			t.Errorf("caddy list-modules in the image lacks %s", m)
		}
	}
	// The image's own Caddyfile, with the sites file it imports, adapts.
	adapted := inRootfs(t, root, "adapt", "--config", "/etc/caddy/Caddyfile")
	for _, want := range []string{`"module":"k8s"`, `":8081"`} {
		if !strings.Contains(adapted, want) {
			t.Errorf("the image's Caddyfile adapted without %s:\n%s", want, adapted)
		}
	}
	// The root is read-only, not merely owned by root: writing a file of it
	// fails with EROFS (a writable root would say "permission denied").
	fmtOut, err := inRootfsErr(root, "/usr/bin/caddy", "fmt", "--overwrite", "/etc/caddy/sites.caddy")
	if err == nil || !strings.Contains(fmtOut, "read-only file system") {
		t.Errorf("caddy fmt --overwrite of a file of the image's root: %v, want a read-only file system error:\n%s", err, fmtOut)
	}
}

// inRootfs runs the image's caddy with args in root, as the pod would:
// private mount namespace, root bind-mounted read-only, tmpfs on /data,
// /config and /tmp, uid and gid 65532.
func inRootfs(t *testing.T, root string, args ...string) string {
	t.Helper()
	out, err := inRootfsErr(root, append([]string{"/usr/bin/caddy"}, args...)...)
	if err != nil {
		t.Fatalf("caddy %s in the image's root: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func inRootfsErr(root string, argv ...string) (string, error) {
	chroot, err := exec.LookPath("chroot")
	if err != nil {
		return "", err
	}
	// The environment is the image's (env -i), not the test's.
	script := `set -e
r=$1; shift
mount --bind "$r" "$r"
mount -o remount,bind,ro "$r"
for d in data config; do mount -t tmpfs -o uid=65532,gid=65532,mode=0755,size=16m tmpfs "$r/$d"; done
mount -t tmpfs -o mode=1777,size=16m tmpfs "$r/tmp"
exec env -i "$@"`
	args := []string{"--mount", "--propagation", "private", "sh", "-c", script, "sh", root}
	args = append(args, imageEnv...)
	args = append(args, chroot, "--userspec=65532:65532", root)
	cmd := exec.Command("unshare", append(args, argv...)...)
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err = cmd.Run()
	return b.String(), err
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// unpack writes the image's filesystem under root with the modes and
// owners of the layer.
func unpack(t *testing.T, img v1.Image, root string) {
	t.Helper()
	r := mutate.Extract(img)
	defer r.Close()
	tr := tar.NewReader(r)
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
		case tar.TypeReg:
			b, _ := io.ReadAll(tr)
			if err := os.WriteFile(p, b, h.FileInfo().Mode().Perm()); err != nil {
				t.Fatal(err)
			}
			if err := os.Lchown(p, h.Uid, h.Gid); err != nil {
				t.Fatal(err)
			}
		default:
			t.Fatalf("%s: unexpected entry type %c", h.Name, h.Typeflag)
		}
	}
	for _, h := range dirs {
		p := filepath.Join(root, filepath.FromSlash(h.Name))
		if err := os.Chmod(p, h.FileInfo().Mode()&(fs.ModePerm|fs.ModeSticky)); err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(p, h.Uid, h.Gid); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
}

// TestRefusesBinaries: an image of a binary that cannot start on an empty
// base, or that is not Caddy with the plugin, is not built.
func TestRefusesBinaries(t *testing.T) {
	dir := t.TempDir()
	hello := filepath.Join(dir, "hello")
	src := filepath.Join(dir, "main.go")
	if err := os.WriteFile(src, []byte("package main\nfunc main() {}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "build", "-trimpath", "-o", hello, src)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	cases := []struct {
		bin, want string
	}{
		{"/bin/sh", "dynamically linked"},
		{hello, "module github.com/caddy-headless/caddy-headless is not in the binary"},
		{src, "not an ELF executable"},
	}
	for _, c := range cases {
		_, err := checkBinary(c.bin, mustRead(t, c.bin))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("checkBinary(%s) = %v, want an error containing %q", c.bin, err, c.want)
		}
	}
}

// TestCranePush is the README's push command, `crane push bin/image REF`
// (crane at the version of this module's go.mod), against a registry on
// loopback: the registry then holds the image under the same digest, and
// crane validates it there.
func TestCranePush(t *testing.T) {
	d, oci, _ := build(t, baseInputs(t), t.TempDir())
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	ref := strings.TrimPrefix(srv.URL, "http://") + "/caddy-headless:dev"
	crane := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("go", append([]string{"tool", "crane"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("crane %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}
	crane("push", oci, ref)
	if got := crane("digest", ref); got != d {
		t.Errorf("crane digest %s = %s, the layout's image is %s", ref, got, d)
	}
	crane("validate", "--remote", ref)
}
