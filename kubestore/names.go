package kubestore

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// How certmagic keys and lock names become Kubernetes objects.
//
// A key is an arbitrary string ("certificates/acme-v02…/*.example.com/*.example.com.crt").
// Its Secret is named <prefix>-<slug>-<hash>: the slug keeps it readable in
// `kubectl get secrets`, the hash (of the prefix and the whole key) makes the
// mapping injective, so "a/b", "a.b" and "a-b" never share a Secret. The
// original key is kept in an annotation and checked on every read, so even a
// hash collision could not hand one key's data to another.
//
// Directories are implicit, as in certmagic: every Secret carries one label
// per ancestor directory (depth → hash of the directory), so List, Exists and
// Delete of a directory select on the server.

const (
	labelStorage  = "storage.caddy-headless.io/prefix" // which fleet (prefix) a Secret belongs to
	labelDirFmt   = "dir.caddy-headless.io/%d"         // hash of the key's ancestor of that depth
	annotationKey = "storage.caddy-headless.io/key"    // the original certmagic key
	annotationMod = "storage.caddy-headless.io/modified"
	secretType    = "caddyserver.com/certmagic"
	dataField     = "value"

	hashLen  = 20  // hex digits (80 bits) in object names
	slugMax  = 100 // readable part of a name
	maxDepth = 32  // components of a key; certmagic's keys have at most 5

	// MaxValueSize is the largest value a Secret holds (the apiserver's
	// limit on a Secret's data).
	MaxValueSize = 1 << 20
)

var prefixRE = regexp.MustCompile(`^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$`)

// validPrefix reports why prefix cannot start object names, or nil.
func validPrefix(prefix string) error {
	if !prefixRE.MatchString(prefix) {
		return fmt.Errorf("prefix %q: want 1-40 lowercase letters, digits and '-', starting with a letter, not ending with '-'", prefix)
	}
	return nil
}

func digest(parts ...string) string {
	h := sha256.New()
	for _, p := range parts {
		// Length-prefixed, so ("ab","c") and ("a","bc") differ.
		h.Write([]byte(strconv.Itoa(len(p)) + ":" + p))
	}
	return hex.EncodeToString(h.Sum(nil))
}

// slug is the readable part of a name: lowercase letters and digits, every
// other run of characters one '-'. "*" reads as "wildcard".
func slug(s string) string {
	s = strings.ReplaceAll(strings.ToLower(s), "*", "wildcard")
	var b strings.Builder
	dash := false
	for _, r := range s {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			if dash && b.Len() > 0 {
				b.WriteByte('-')
			}
			dash = false
			b.WriteRune(r)
			if b.Len() >= slugMax {
				break
			}
			continue
		}
		dash = true
	}
	return strings.Trim(b.String(), "-")
}

// objectName is the name of the Secret (kind "key") or Lease (kind "lock")
// for a certmagic key or lock name.
func objectName(prefix, kind, name string) string {
	s := slug(name)
	h := digest(prefix, kind, name)[:hashLen]
	if kind == "lock" {
		prefix += "-lock"
	}
	if s == "" {
		return prefix + "-" + h
	}
	return prefix + "-" + s + "-" + h
}

// checkKey rejects keys certmagic never makes and that have no place in a
// directory tree: empty, leading or trailing '/', empty components, too deep.
func checkKey(key string) error {
	if key == "" {
		return fmt.Errorf("storage key is empty")
	}
	parts := strings.Split(key, "/")
	if len(parts) > maxDepth {
		return fmt.Errorf("storage key %q: %d components, at most %d", key, len(parts), maxDepth)
	}
	for _, p := range parts {
		if p == "" {
			return fmt.Errorf("storage key %q: empty component (leading, trailing or double '/')", key)
		}
	}
	return nil
}

// normDir is a directory prefix as List, Exists and Delete take it: certmagic
// passes "certificates" or "acme/ca/users", never with slashes around; a
// trailing slash is forgiven.
func normDir(p string) string { return strings.Trim(p, "/") }

// dirLabel is the label selecting every key below the directory dir ("" is
// the root: every key of the fleet).
func dirLabel(prefix, dir string) (string, string) {
	depth := strings.Count(dir, "/") + 1
	return fmt.Sprintf(labelDirFmt, depth), digest(prefix, "dir", dir)[:32]
}

// keyLabels are the labels of the Secret of key.
func keyLabels(prefix, key string) map[string]string {
	l := map[string]string{labelStorage: prefix}
	for i := range len(key) {
		if key[i] == '/' {
			k, v := dirLabel(prefix, key[:i])
			l[k] = v
		}
	}
	return l
}

// selector is a label selector for the Secrets below dir.
func selector(prefix, dir string) string {
	sel := labelStorage + "=" + prefix
	if dir != "" {
		k, v := dirLabel(prefix, dir)
		sel += "," + k + "=" + v
	}
	return sel
}
