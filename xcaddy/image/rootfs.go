package main

import (
	"archive/tar"
	"bytes"
	"crypto/x509"
	"debug/buildinfo"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// The image runs as this user; /data and /config belong to it.
const (
	uid      = 65532
	userName = "nonroot"
)

// pluginModule must be in the binary's build info: an image of a Caddy
// without the plugin is refused.
const pluginModule = "github.com/caddy-headless/caddy-headless"

// file is one entry of the root filesystem.
type file struct {
	path string // absolute, cleaned
	mode fs.FileMode
	uid  int
	dir  bool
	data []byte
}

// inputs are what the root filesystem is made of.
type inputs struct {
	caddy      string   // static Caddy binary with the plugin
	caddyFiles []string // copied into /etc/caddy under their base names
	caBundle   string   // PEM bundle for /etc/ssl/certs/ca-certificates.crt
}

// rootfs returns the files of the image, sorted by path, with the
// architecture of the binary (GOARCH and, for arm, the variant).
func rootfs(in inputs) ([]file, platform, error) {
	bin, err := os.ReadFile(in.caddy)
	if err != nil {
		return nil, platform{}, err
	}
	plat, err := checkBinary(in.caddy, bin)
	if err != nil {
		return nil, platform{}, err
	}
	ca, err := os.ReadFile(in.caBundle)
	if err != nil {
		return nil, platform{}, fmt.Errorf("CA bundle: %w", err)
	}
	if !x509.NewCertPool().AppendCertsFromPEM(ca) {
		return nil, platform{}, fmt.Errorf("CA bundle %s: no PEM certificate in it", in.caBundle)
	}
	if len(in.caddyFiles) == 0 {
		return nil, platform{}, fmt.Errorf("no Caddyfile given (-etc-caddy)")
	}
	dirs := func(uid int, mode fs.FileMode, paths ...string) []file {
		var out []file
		for _, p := range paths {
			out = append(out, file{path: p, dir: true, mode: mode, uid: uid})
		}
		return out
	}
	files := dirs(0, 0o755, "/etc", "/etc/caddy", "/etc/ssl", "/etc/ssl/certs", "/usr", "/usr/bin")
	files = append(files, dirs(uid, 0o755, "/data", "/config")...)
	files = append(files, file{path: "/tmp", dir: true, mode: fs.ModeSticky | 0o777})
	files = append(files,
		file{path: "/usr/bin/caddy", mode: 0o755, data: bin},
		file{path: "/etc/ssl/certs/ca-certificates.crt", mode: 0o644, data: ca},
		// Names for the image's users, so that tools show "nonroot"
		// rather than a bare number, as distroless images do.
		file{path: "/etc/passwd", mode: 0o644, data: fmt.Appendf(nil,
			"root:x:0:0:root:/root:/sbin/nologin\n%s:x:%d:%d:%s:/data:/sbin/nologin\n", userName, uid, uid, userName)},
		file{path: "/etc/group", mode: 0o644, data: fmt.Appendf(nil, "root:x:0:\n%s:x:%d:\n", userName, uid)},
		// Go's resolver reads this order; a pod's /etc/hosts comes first.
		file{path: "/etc/nsswitch.conf", mode: 0o644, data: []byte("hosts: files dns\n")},
	)
	seen := map[string]string{}
	for _, src := range in.caddyFiles {
		b, err := os.ReadFile(src)
		if err != nil {
			return nil, platform{}, err
		}
		name := filepath.Base(src)
		if prev, dup := seen[name]; dup {
			return nil, platform{}, fmt.Errorf("-etc-caddy %s and %s both become /etc/caddy/%s", prev, src, name)
		}
		seen[name] = src
		files = append(files, file{path: "/etc/caddy/" + name, mode: 0o644, data: b})
	}
	sort.Slice(files, func(i, j int) bool { return files[i].path < files[j].path })
	return files, plat, nil
}

// platform is what the image config and the index say the image runs on.
type platform struct{ os, arch, variant string }

// checkBinary refuses a binary that would not start on an empty base (linked
// against libc: cgo) or that is not Caddy with this plugin.
func checkBinary(name string, bin []byte) (platform, error) {
	ef, err := elf.NewFile(bytes.NewReader(bin))
	if err != nil {
		return platform{}, fmt.Errorf("%s: not an ELF executable: %w", name, err)
	}
	defer ef.Close()
	for _, p := range ef.Progs {
		if p.Type == elf.PT_INTERP {
			return platform{}, fmt.Errorf("%s is dynamically linked (it asks for a program interpreter): build it with CGO_ENABLED=0", name)
		}
	}
	if libs, _ := ef.ImportedLibraries(); len(libs) > 0 {
		return platform{}, fmt.Errorf("%s needs shared libraries %v: build it with CGO_ENABLED=0", name, libs)
	}
	bi, err := buildinfo.Read(bytes.NewReader(bin))
	if err != nil {
		return platform{}, fmt.Errorf("%s: no Go build info: %w", name, err)
	}
	found := false
	for _, d := range bi.Deps {
		if d.Path == pluginModule {
			found = true
		}
	}
	if !found {
		return platform{}, fmt.Errorf("%s: module %s is not in the binary (go version -m %s): build it with xcaddy/build.sh", name, pluginModule, name)
	}
	set := map[string]string{}
	for _, s := range bi.Settings {
		set[s.Key] = s.Value
	}
	if set["CGO_ENABLED"] != "0" {
		return platform{}, fmt.Errorf("%s was built with CGO_ENABLED=%q: build it with CGO_ENABLED=0", name, set["CGO_ENABLED"])
	}
	if set["-trimpath"] != "true" {
		return platform{}, fmt.Errorf("%s was built without -trimpath: the image would depend on the build machine's paths", name)
	}
	p := platform{os: set["GOOS"], arch: set["GOARCH"]}
	if p.os != "linux" {
		return platform{}, fmt.Errorf("%s is built for GOOS=%q, want linux", name, p.os)
	}
	if p.arch == "arm" {
		p.variant = "v" + strings.TrimSuffix(set["GOARM"], ",softfloat")
	}
	return p, nil
}

// writeTar writes files as a tar stream with fixed times and owners, so
// that the same inputs give the same bytes.
func writeTar(w io.Writer, files []file, mtime time.Time) error {
	tw := tar.NewWriter(w)
	for _, f := range files {
		h := &tar.Header{
			Name:    strings.TrimPrefix(f.path, "/"),
			Mode:    int64(f.mode.Perm()),
			Uid:     f.uid,
			Gid:     f.uid,
			ModTime: mtime,
			Format:  tar.FormatPAX,
		}
		if f.mode&fs.ModeSticky != 0 {
			h.Mode |= 0o1000
		}
		if f.dir {
			h.Typeflag = tar.TypeDir
			h.Name += "/"
		} else {
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(f.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if !f.dir {
			if _, err := tw.Write(f.data); err != nil {
				return err
			}
		}
	}
	return tw.Close()
}

// writeDir writes files under dir, the way the Containerfile's build stage
// prepares the root filesystem it copies onto scratch.
func writeDir(dir string, files []file, mtime time.Time) error {
	for _, f := range files {
		p := filepath.Join(dir, filepath.FromSlash(path.Clean(f.path)))
		if f.dir {
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
		} else if err := os.WriteFile(p, f.data, f.mode.Perm()); err != nil {
			return err
		}
		if err := os.Chmod(p, f.mode); err != nil {
			return err
		}
		if err := os.Lchown(p, f.uid, f.uid); err != nil {
			return fmt.Errorf("%s: %w (writing a root filesystem needs root)", p, err)
		}
	}
	// Times last: creating a file changes its directory's.
	for i := len(files) - 1; i >= 0; i-- {
		p := filepath.Join(dir, filepath.FromSlash(files[i].path))
		if err := os.Chtimes(p, mtime, mtime); err != nil {
			return err
		}
	}
	return nil
}
