package files

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"net/url"
	"path"
	"strings"
	"testing"
)

func TestNegotiateEncoding(t *testing.T) {
	tests := map[string]string{
		"":                           "identity",
		"gzip":                       "gzip",
		"gzip, deflate, br":          "gzip", // what undici's fetch sends
		"GZIP;q=0.5":                 "gzip",
		"x-gzip":                     "gzip",
		"br":                         "identity",
		"gzip;q=0":                   "identity",
		"identity;q=1, gzip;q=0.5":   "identity",
		"identity;q=0.5, gzip;q=0.8": "gzip",
		"*":                          "gzip",
		"*;q=0":                      "",
		"*;q=0, gzip":                "gzip",
		"identity;q=0":               "",
		"identity;q=0, br":           "",
		"identity;q=0, gzip":         "gzip",
		"gzip;q=nonsense":            "identity",
		"gzip;q=2":                   "identity",
		" , ;;, gzip ; q = 0.1 ":     "gzip",
	}
	for in, want := range tests {
		if got := NegotiateEncoding(in); got != want {
			t.Errorf("NegotiateEncoding(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzNegotiateEncoding(f *testing.F) {
	for _, s := range []string{"gzip", "identity;q=0", "*;q=0.1, gzip;q=0", ";q=", ",,,"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		switch got := NegotiateEncoding(s); got {
		case "gzip", "identity", "":
		default:
			t.Fatalf("NegotiateEncoding(%q) = %q", s, got)
		}
	})
}

func TestPartFilename(t *testing.T) {
	tests := map[string]string{
		`form-data; name="file"; filename="/home/user/a/b.txt"`: "/home/user/a/b.txt",
		`form-data; name="file"; filename="rel/c.txt"`:          "rel/c.txt",
		`form-data; name="file"`:                                "",
		`form-data; name="file"; filename*=UTF-8''%C3%A9.txt`:   "é.txt",
		`garbage;;;`: "",
	}
	for in, want := range tests {
		if got := PartFilename(in); got != want {
			t.Errorf("PartFilename(%q) = %q, want %q", in, got, want)
		}
	}
}

// capture is a sink that keeps what an upload would have written.
type capture struct {
	files map[string]string
	fail  error
}

func (c *capture) store(target string, md map[string]string, src io.Reader) (Entry, error) {
	b, err := io.ReadAll(src)
	if err != nil {
		return Entry{}, fail(http.StatusBadRequest, "read: %w", err)
	}
	if c.fail != nil {
		return Entry{}, c.fail
	}
	if c.files == nil {
		c.files = map[string]string{}
	}
	c.files[target] = string(b)
	return Entry{Path: target, Name: path.Base(target), Type: "file", Metadata: md}, nil
}

func resolveClean(p string) (string, error) {
	if strings.Contains(p, "\x00") {
		return "", errors.New("NUL")
	}
	return path.Clean("/work/" + p), nil
}

func multipartOf(t testing.TB, parts ...[3]string) (string, string) {
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for _, p := range parts {
		h := textproto.MIMEHeader{}
		cd := fmt.Sprintf(`form-data; name=%q`, p[0])
		if p[1] != "" {
			cd += fmt.Sprintf(`; filename=%q`, p[1])
		}
		h.Set("Content-Disposition", cd)
		w, err := mw.CreatePart(h)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(w, p[2])
	}
	mw.Close()
	return buf.String(), mw.FormDataContentType()
}

func TestReadUpload(t *testing.T) {
	body, ctype := multipartOf(t, [3]string{"other", "", "ignored"}, [3]string{"file", "a/x.txt", "X"}, [3]string{"file", "/abs/y.txt", "Y"})
	req, _ := http.NewRequest(http.MethodPost, "/files", strings.NewReader(body))
	req.Header.Set("Content-Type", ctype)
	req.Header.Set("X-Metadata-Tag", "t")
	var c capture
	entries, err := readUpload(req, c.store, resolveClean)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2 || c.files["a/x.txt"] != "X" || c.files["/abs/y.txt"] != "Y" || entries[0].Metadata["tag"] != "t" {
		t.Errorf("entries %+v files %v", entries, c.files)
	}

	// A sink failure is the upload's failure, with its status.
	req, _ = http.NewRequest(http.MethodPost, "/files?path=z", strings.NewReader("z"))
	c = capture{fail: fail(http.StatusInsufficientStorage, "full")}
	var se *statusError
	if _, err := readUpload(req, c.store, resolveClean); !errors.As(err, &se) || se.status != http.StatusInsufficientStorage {
		t.Errorf("sink failure: %v", err)
	}
}

// FuzzReadUpload throws arbitrary bodies, content types, encodings and paths at the
// upload parser. The sink only records: a fuzzer with root's rights must not write
// to the host's disk.
func FuzzReadUpload(f *testing.F) {
	body, ctype := multipartOf(f, [3]string{"file", "a/b.txt", "hello"}, [3]string{"file", "", "no name"})
	f.Add([]byte(body), ctype, "", "")
	f.Add([]byte(body), ctype, "", "forced/path")
	f.Add([]byte("raw"), "application/octet-stream", "", "raw.txt")
	f.Add([]byte("\x1f\x8b\x08\x00\x00\x00\x00\x00"), "application/octet-stream", "gzip", "gz.txt")
	f.Add([]byte("--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"../../x\"\r\n\r\nx\r\n--b--\r\n"), "multipart/form-data; boundary=b", "", "")
	f.Add([]byte(""), "multipart/form-data", "", "")
	f.Fuzz(func(t *testing.T, body []byte, ctype, encoding, target string) {
		req, err := http.NewRequest(http.MethodPost, "/files?path="+url.QueryEscape(target), bytes.NewReader(body))
		if err != nil {
			return
		}
		req.Header.Set("Content-Type", ctype)
		req.Header.Set("Content-Encoding", encoding)
		var c capture
		entries, err := readUpload(req, c.store, resolveClean)
		if err != nil {
			var se *statusError
			if !errors.As(err, &se) || se.status < 400 || se.status > 599 {
				t.Fatalf("error without an HTTP status: %v", err)
			}
			return
		}
		if len(entries) == 0 {
			t.Fatal("success without entries")
		}
		for _, e := range entries {
			if _, ok := c.files[e.Path]; !ok || e.Type != "file" {
				t.Fatalf("entry %+v was never stored", e)
			}
			if target != "" && e.Path != target {
				t.Fatalf("entry %q ignores the path parameter %q", e.Path, target)
			}
		}
	})
}
