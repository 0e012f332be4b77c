package identity

import (
	"encoding/base64"
	"errors"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
)

func TestResolvePath(t *testing.T) {
	tests := []struct {
		path, home, workdir, want string
	}{
		{"/etc/passwd", "/home/user", "/work", "/etc/passwd"},
		{"file.txt", "/home/user", "", "/home/user/file.txt"},
		{"file.txt", "/home/user", "/work", "/work/file.txt"},
		{"", "/home/user", "", "/home/user"},
		{"", "/home/user", "/work", "/work"},
		{"~", "/home/user", "/work", "/home/user"},
		{"~/a/b", "/home/user", "/work", "/home/user/a/b"},
		{"~other/x", "/home/user", "/work", "/work/~other/x"}, // only "~" and "~/" expand
		{"../../etc", "/home/user", "", "/etc"},
		{"../../../../../etc", "/home/user", "", "/etc"},
		{"a/./b//c/../d/", "/home/user", "", "/home/user/a/b/d"},
		{"/a/../../b", "/home/user", "", "/b"},
		{"x", "", "", "/x"},                  // a user without a home
		{"x", "rel/home", "", "/rel/home/x"}, // never a relative result
		{"~", "", "", "/"},
	}
	for _, tc := range tests {
		got, err := ResolvePath(tc.path, tc.home, tc.workdir)
		if err != nil || got != tc.want {
			t.Errorf("ResolvePath(%q, %q, %q) = %q, %v; want %q", tc.path, tc.home, tc.workdir, got, err, tc.want)
		}
	}
	if _, err := ResolvePath("a\x00b", "/home/user", ""); !errors.Is(err, ErrInvalidPath) {
		t.Errorf("NUL byte: %v, want ErrInvalidPath", err)
	}
}

func FuzzResolvePath(f *testing.F) {
	for _, s := range []string{"", "~", "~/x", "../../etc", "/a/b/../c", "a\x00b", "//x//y/", "~user"} {
		f.Add(s, "/home/user", "/work")
	}
	f.Fuzz(func(t *testing.T, p, home, workdir string) {
		got, err := ResolvePath(p, home, workdir)
		if err != nil {
			if !strings.Contains(p+home+workdir, "\x00") {
				t.Fatalf("ResolvePath(%q, %q, %q) failed: %v", p, home, workdir, err)
			}
			return
		}
		if !filepath.IsAbs(got) || filepath.Clean(got) != got {
			t.Fatalf("ResolvePath(%q, %q, %q) = %q: not absolute and clean", p, home, workdir, got)
		}
		// Resolving a resolved path changes nothing.
		if again, err := ResolvePath(got, home, workdir); err != nil || again != got {
			t.Fatalf("not idempotent: %q → %q → %q (%v)", p, got, again, err)
		}
	})
}

func basic(s string) string { return "Basic " + base64.StdEncoding.EncodeToString([]byte(s)) }

func TestParseBasicUser(t *testing.T) {
	tests := []struct {
		header string
		want   string
		ok     bool
	}{
		{basic("user:"), "user", true},
		{basic("root:ignored-password"), "root", true},
		{"basic " + base64.StdEncoding.EncodeToString([]byte("user:")), "user", true},
		{basic("noColon"), "noColon", true},
		{basic(":"), "", false},
		{"Bearer abc", "", false},
		{"Basic !!!", "", false},
		{"Basic", "", false},
	}
	for _, tc := range tests {
		got, err := ParseBasicUser(tc.header)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseBasicUser(%q) = %q, %v; want %q ok=%v", tc.header, got, err, tc.want, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrBadAuthorization) {
			t.Errorf("error %v does not wrap ErrBadAuthorization", err)
		}
	}
	if name, err := RequestedUser(http.Header{}); name != "" || err != nil {
		t.Errorf("no header: %q %v", name, err)
	}
}

func FuzzParseBasicUser(f *testing.F) {
	f.Add(basic("user:"))
	f.Add("Basic ")
	f.Add("basic dXNlcjo=")
	f.Fuzz(func(t *testing.T, h string) {
		name, err := ParseBasicUser(h)
		if err == nil && (name == "" || strings.Contains(name, ":")) {
			t.Fatalf("ParseBasicUser(%q) = %q", h, name)
		}
	})
}

func TestLookup(t *testing.T) {
	root, err := Lookup("root")
	if err != nil || root.UID != 0 || root.GID != 0 || root.Home != "/root" || len(root.Groups) == 0 || root.Groups[0] != 0 {
		t.Errorf("Lookup(root) = %+v, %v", root, err)
	}
	nobody, err := Lookup("nobody")
	if err != nil || nobody.UID != 65534 {
		t.Errorf("Lookup(nobody) = %+v, %v", nobody, err)
	}
	for _, name := range []string{"no-such-user-xyz", "", "root:x", "a\nb"} {
		if _, err := Lookup(name); !errors.Is(err, ErrUnknownUser) {
			t.Errorf("Lookup(%q): %v, want ErrUnknownUser", name, err)
		}
	}
}
