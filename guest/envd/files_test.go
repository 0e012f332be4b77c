package envd

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	fspb "github.com/cubicle-dev/cubicle/guest/envd/gen/filesystem"
)

type uploaded struct {
	Path     string            `json:"path"`
	Name     string            `json:"name"`
	Type     string            `json:"type"`
	Metadata map[string]string `json:"metadata"`
}

// multipartBody builds a form with one `file` part per filename → content.
func multipartBody(t *testing.T, parts [][2]string) (io.Reader, string) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for _, p := range parts {
		h := textproto.MIMEHeader{}
		if p[0] == "" {
			h.Set("Content-Disposition", `form-data; name="file"`)
		} else {
			h.Set("Content-Disposition", fmt.Sprintf(`form-data; name="file"; filename=%q`, p[0]))
		}
		h.Set("Content-Type", "application/octet-stream")
		w, err := mw.CreatePart(h)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(w, p[1])
	}
	mw.Close()
	return &buf, mw.FormDataContentType()
}

func decodeUploaded(t *testing.T, res *http.Response) []uploaded {
	t.Helper()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("upload: %d %s", res.StatusCode, readBody(t, res))
	}
	var out []uploaded
	if err := json.NewDecoder(res.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	return out
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestUpload(t *testing.T) {
	e := newEnv(t)
	t.Run("octet-stream creates parents, relative to workdir", func(t *testing.T) {
		res := e.do(http.MethodPost, "/files?path=a/b/raw.txt", strings.NewReader("raw body"), map[string]string{"Content-Type": "application/octet-stream"})
		got := decodeUploaded(t, res)
		want := filepath.Join(e.dir, "a/b/raw.txt")
		if len(got) != 1 || got[0].Path != want || got[0].Name != "raw.txt" || got[0].Type != "file" || got[0].Metadata != nil || mustRead(t, want) != "raw body" {
			t.Errorf("got %+v", got)
		}
	})
	t.Run("gzip-encoded body", func(t *testing.T) {
		var zbuf bytes.Buffer
		zw := gzip.NewWriter(&zbuf)
		zw.Write(bytes.Repeat([]byte("z"), 100000))
		zw.Close()
		res := e.do(http.MethodPost, "/files?path=gz.txt", &zbuf, map[string]string{"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"})
		decodeUploaded(t, res)
		if got := mustRead(t, filepath.Join(e.dir, "gz.txt")); got != strings.Repeat("z", 100000) {
			t.Errorf("stored %d bytes", len(got))
		}
	})
	t.Run("multipart with paths in filenames", func(t *testing.T) {
		abs := filepath.Join(e.dir, "abs/two.txt")
		body, ctype := multipartBody(t, [][2]string{{"m/one.txt", "one"}, {abs, "two"}})
		got := decodeUploaded(t, e.do(http.MethodPost, "/files", body, map[string]string{"Content-Type": ctype}))
		if len(got) != 2 || got[0].Path != filepath.Join(e.dir, "m/one.txt") || got[1].Path != abs || mustRead(t, abs) != "two" {
			t.Errorf("got %+v", got)
		}
	})
	t.Run("multipart part without filename uses the path parameter", func(t *testing.T) {
		body, ctype := multipartBody(t, [][2]string{{"", "from form"}})
		got := decodeUploaded(t, e.do(http.MethodPost, "/files?path=~/../"+filepath.Base(e.dir)+"/q.txt&username=root", body, map[string]string{"Content-Type": ctype}))
		// ~ is root's home (/root); ../<workdir base> then leaves it: paths are
		// resolved lexically, the sandbox root is the only boundary.
		if want := filepath.Join("/", filepath.Base(e.dir), "q.txt"); len(got) != 1 || got[0].Path != want {
			t.Errorf("got %+v, want %s", got, want)
		}
		os.Remove(got[0].Path)
	})
	t.Run("owned by the requesting user", func(t *testing.T) {
		got := decodeUploaded(t, e.do(http.MethodPost, "/files?path=owned/x.txt&username=nobody", strings.NewReader("x"), map[string]string{"Content-Type": "application/octet-stream"}))
		for _, p := range []string{got[0].Path, filepath.Dir(got[0].Path)} {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if st := fi.Sys().(*syscall.Stat_t); st.Uid != 65534 || st.Gid != 65534 {
				t.Errorf("%s owned by %d:%d, want nobody", p, st.Uid, st.Gid)
			}
		}
	})
	t.Run("metadata headers become xattrs and are replaced on overwrite", func(t *testing.T) {
		hdr := map[string]string{"Content-Type": "application/octet-stream", "X-Metadata-Author": "mish", "X-Metadata-purpose": "upload"}
		got := decodeUploaded(t, e.do(http.MethodPost, "/files?path=meta.txt", strings.NewReader("m"), hdr))
		want := map[string]string{"author": "mish", "purpose": "upload"}
		if fmt.Sprint(got[0].Metadata) != fmt.Sprint(want) {
			t.Errorf("response metadata %v", got[0].Metadata)
		}
		st, err := e.fs.Stat(e.ctx(5*time.Second), connect.NewRequest(&fspb.StatRequest{Path: "meta.txt"}))
		if err != nil || fmt.Sprint(st.Msg.GetEntry().GetMetadata()) != fmt.Sprint(want) {
			t.Errorf("Stat metadata %v %v", st.Msg.GetEntry().GetMetadata(), err)
		}
		got = decodeUploaded(t, e.do(http.MethodPost, "/files?path=meta.txt", strings.NewReader("m2"), map[string]string{"Content-Type": "application/octet-stream", "X-Metadata-Author": "other"}))
		if len(got) != 1 || len(got[0].Metadata) != 1 || got[0].Metadata["author"] != "other" {
			t.Errorf("overwrite response metadata %v", got)
		}
		st, _ = e.fs.Stat(e.ctx(5*time.Second), connect.NewRequest(&fspb.StatRequest{Path: "meta.txt"}))
		if md := st.Msg.GetEntry().GetMetadata(); len(md) != 1 || md["author"] != "other" {
			t.Errorf("after overwrite: %v", md)
		}
		// Raw JSON: no metadata key at all when there is none (the SDK's tests
		// compare the upload answer with deepEqual).
		res := e.do(http.MethodPost, "/files?path=plain.txt", strings.NewReader("p"), map[string]string{"Content-Type": "application/octet-stream"})
		if body := readBody(t, res); body != fmt.Sprintf(`[{"path":%q,"name":"plain.txt","type":"file"}]`, filepath.Join(e.dir, "plain.txt")) {
			t.Errorf("body %s", body)
		}
	})
	t.Run("errors", func(t *testing.T) {
		if err := os.Mkdir(filepath.Join(e.dir, "adir"), 0o755); err != nil {
			t.Fatal(err)
		}
		dup, dupType := multipartBody(t, [][2]string{{"same.txt", "1"}, {"same.txt", "2"}})
		noname, nonameType := multipartBody(t, [][2]string{{"", "x"}})
		octet := map[string]string{"Content-Type": "application/octet-stream"}
		cases := []struct {
			name   string
			path   string
			body   io.Reader
			hdr    map[string]string
			status int
		}{
			{"raw without path", "/files", strings.NewReader("x"), octet, 400},
			{"onto a directory", "/files?path=adir", strings.NewReader("x"), octet, 400},
			{"below a file", "/files?path=plain.txt/child", strings.NewReader("x"), octet, 400},
			{"unknown user", "/files?path=x&username=no-such-user", strings.NewReader("x"), octet, 401},
			{"bad gzip", "/files?path=x", strings.NewReader("not gzip"), map[string]string{"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"}, 400},
			{"unknown encoding", "/files?path=x", strings.NewReader("x"), map[string]string{"Content-Type": "application/octet-stream", "Content-Encoding": "br"}, 415},
			{"unsupported type", "/files?path=x", strings.NewReader("x"), map[string]string{"Content-Type": "text/plain"}, 400},
			{"two parts one path", "/files", dup, map[string]string{"Content-Type": dupType}, 400},
			{"part without any path", "/files", noname, map[string]string{"Content-Type": nonameType}, 400},
			{"multipart without boundary", "/files", strings.NewReader("x"), map[string]string{"Content-Type": "multipart/form-data"}, 400},
			{"truncated multipart", "/files", strings.NewReader("--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t\"\r\n\r\nabc"), map[string]string{"Content-Type": "multipart/form-data; boundary=b"}, 400},
			{"metadata value not printable", "/files?path=x", strings.NewReader("x"), map[string]string{"Content-Type": "application/octet-stream", "X-Metadata-K": "caf\u00e9"}, 400},
			{"metadata too large", "/files?path=x", strings.NewReader("x"), map[string]string{"Content-Type": "application/octet-stream", "X-Metadata-K": strings.Repeat("v", 5000)}, 400},
			{"disk full", "/files?path=/dev/full&username=root", strings.NewReader("x"), octet, 507},
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				res := e.do(http.MethodPost, c.path, c.body, c.hdr)
				if code, msg := jsonError(t, res); code != c.status {
					t.Errorf("%d %q, want %d", code, msg, c.status)
				}
			})
		}
	})
}

// TestUploadStreamsToDisk uploads 50 MB and checks envd did not hold it in memory.
func TestUploadStreamsToDisk(t *testing.T) {
	e := newEnv(t)
	const size = 50 << 20
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	res := e.do(http.MethodPost, "/files?path=big.bin", io.LimitReader(zeros{}, size), map[string]string{"Content-Type": "application/octet-stream"})
	decodeUploaded(t, res)
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	// Client and server share this process; together they may allocate buffers,
	// but nowhere near the body's size.
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > size/4 {
		t.Errorf("allocated %d MiB to upload %d MiB", alloc>>20, size>>20)
	}
	if fi, err := os.Stat(filepath.Join(e.dir, "big.bin")); err != nil || fi.Size() != size {
		t.Errorf("stored %v %v", fi, err)
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func TestDownload(t *testing.T) {
	e := newEnv(t)
	content := strings.Repeat("0123456789", 1000)
	path := filepath.Join(e.dir, "dl.txt")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(e.dir, "adir"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Run("whole file, relative path", func(t *testing.T) {
		res := e.do(http.MethodGet, "/files?path=dl.txt", nil, nil)
		if res.StatusCode != 200 || readBody(t, res) != content || res.Header.Get("Content-Length") != strconv.Itoa(len(content)) {
			t.Errorf("%d %v", res.StatusCode, res.Header)
		}
	})
	t.Run("range", func(t *testing.T) {
		res := e.do(http.MethodGet, "/files?path="+url.QueryEscape(path), nil, map[string]string{"Range": "bytes=10-19", "Accept-Encoding": "gzip"})
		if body := readBody(t, res); res.StatusCode != http.StatusPartialContent || body != "0123456789" || res.Header.Get("Content-Encoding") != "" {
			t.Errorf("%d %q %v", res.StatusCode, body, res.Header)
		}
	})
	t.Run("gzip", func(t *testing.T) {
		res := e.do(http.MethodGet, "/files?path=dl.txt", nil, map[string]string{"Accept-Encoding": "gzip"})
		if res.Header.Get("Content-Encoding") != "gzip" {
			t.Fatalf("Content-Encoding %q", res.Header.Get("Content-Encoding"))
		}
		zr, err := gzip.NewReader(res.Body)
		if err != nil {
			t.Fatal(err)
		}
		if b, err := io.ReadAll(zr); err != nil || string(b) != content {
			t.Errorf("gunzipped %d bytes, %v", len(b), err)
		}
	})
	t.Run("errors", func(t *testing.T) {
		cases := []struct {
			query  string
			hdr    map[string]string
			status int
			msg    string
		}{
			{"path=missing.txt", nil, 404, "path '" + filepath.Join(e.dir, "missing.txt") + "' does not exist"},
			{"path=adir", nil, 400, "is a directory"},
			{"path=/dev/null", nil, 400, "not a regular file"},
			{"path=dl.txt/below", nil, 400, "invalid path"},
			{"path=dl.txt&username=no-such-user", nil, 401, "no-such-user"},
			{"path=dl.txt", map[string]string{"Accept-Encoding": "identity;q=0, br"}, 406, "no acceptable encoding"},
		}
		for _, c := range cases {
			res := e.do(http.MethodGet, "/files?"+c.query, nil, c.hdr)
			if code, msg := jsonError(t, res); code != c.status || !strings.Contains(msg, c.msg) {
				t.Errorf("%s: %d %q, want %d containing %q", c.query, code, msg, c.status, c.msg)
			}
		}
	})
}

func TestFilesSignatures(t *testing.T) {
	e := newEnv(t)
	postInit(t, e, `{"accessToken":"tok"}`)
	path := filepath.Join(e.dir, "s.txt")
	if err := os.WriteFile(path, []byte("signed"), 0o644); err != nil {
		t.Fatal(err)
	}
	future := time.Now().Add(time.Hour).Unix()
	past := time.Now().Add(-time.Hour).Unix()
	q := func(p, user, sig string, exp int64) string {
		v := url.Values{"path": {p}, "signature": {sig}}
		if user != "" {
			v.Set("username", user)
		}
		if exp != 0 {
			v.Set("signature_expiration", strconv.FormatInt(exp, 10))
		}
		return "/files?" + v.Encode()
	}
	cases := []struct {
		name   string
		method string
		target string
		hdr    map[string]string
		status int
		msg    string
	}{
		{"read, no expiry", "GET", q("s.txt", "", Sign("s.txt", SignRead, "", "tok", 0), 0), nil, 200, ""},
		{"read with user and expiry", "GET", q("s.txt", "root", Sign("s.txt", SignRead, "root", "tok", future), future), nil, 200, ""},
		{"expired", "GET", q("s.txt", "", Sign("s.txt", SignRead, "", "tok", past), past), nil, 401, "signature is already expired"},
		{"write signature used to read", "GET", q("s.txt", "", Sign("s.txt", SignWrite, "", "tok", 0), 0), nil, 401, "invalid signature"},
		{"signature for another path", "GET", q("s.txt", "", Sign("other.txt", SignRead, "", "tok", 0), 0), nil, 401, "invalid signature"},
		{"signature for another user", "GET", q("s.txt", "root", Sign("s.txt", SignRead, "", "tok", 0), 0), nil, 401, "invalid signature"},
		{"expiry stripped", "GET", q("s.txt", "", Sign("s.txt", SignRead, "", "tok", future), 0), nil, 401, "invalid signature"},
		{"wrong token", "GET", q("s.txt", "", Sign("s.txt", SignRead, "", "other", 0), 0), nil, 401, "invalid signature"},
		{"no signature", "GET", "/files?path=s.txt", nil, 401, "missing signature"},
		{"token header instead", "GET", "/files?path=s.txt", map[string]string{AccessTokenHeader: "tok"}, 200, ""},
		{"wrong token header", "GET", q("s.txt", "", Sign("s.txt", SignRead, "", "tok", 0), 0), map[string]string{AccessTokenHeader: "bad"}, 401, "does not match"},
		{"upload signed", "POST", q("up.txt", "", Sign("up.txt", SignWrite, "", "tok", future), future), map[string]string{"Content-Type": "application/octet-stream"}, 200, ""},
		{"upload with read signature", "POST", q("up.txt", "", Sign("up.txt", SignRead, "", "tok", 0), 0), map[string]string{"Content-Type": "application/octet-stream"}, 401, "invalid signature"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req, _ := http.NewRequest(c.method, e.url+c.target, strings.NewReader("uploaded"))
			for k, v := range c.hdr {
				req.Header.Set(k, v)
			}
			res, err := http.DefaultClient.Do(req) // no token from the harness
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			if c.status != 200 {
				if code, msg := jsonError(t, res); code != c.status || !strings.Contains(msg, c.msg) {
					t.Errorf("%d %q, want %d containing %q", code, msg, c.status, c.msg)
				}
			} else if res.StatusCode != 200 {
				t.Errorf("%d %s", res.StatusCode, readBody(t, res))
			}
		})
	}
}

func TestSignMatchesSDK(t *testing.T) {
	// Golden values from the e2b JS SDK 2.51.0's exported getSignature().
	cases := []struct {
		path, op, user, token string
		exp                   int64
		want                  string
	}{
		{"/home/user/a.txt", SignRead, "user", "token", 0, "v1_tE6x2QqeKriEoa6iRhiX5fCKcheLopDKKcPNfXl08qs"},
		{"/home/user/a.txt", SignWrite, "", "token", 1700000000, "v1_/QFU6Hp2hF7v5ySfnDo5kxRiHwB7t5M2eTQpGZNxapo"},
	}
	for _, c := range cases {
		if got := Sign(c.path, c.op, c.user, c.token, c.exp); got != c.want {
			t.Errorf("Sign(%q, %q, %q, %q, %d) = %s, want %s", c.path, c.op, c.user, c.token, c.exp, got, c.want)
		}
	}
}
