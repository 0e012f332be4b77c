package envd

import (
	"errors"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func FuzzParseInitRequest(f *testing.F) {
	for _, s := range []string{
		`{"envVars":{"A":"b"},"accessToken":"t","timestamp":"2024-01-02T03:04:05.123Z","defaultUser":"user","defaultWorkdir":"/home/user"}`,
		`{}`, `null`, `{"envVars":null}`, `{"envVars":{"":"x"}}`, `{"defaultWorkdir":"/a/../b/"}`, `{"timestamp":""}`, `[1]`, `{"a":1} x`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, err := ParseInitRequest(strings.NewReader(string(body)))
		if err != nil {
			if !errors.Is(err, ErrInvalidInit) {
				t.Fatalf("error %v does not wrap ErrInvalidInit", err)
			}
			return
		}
		for k, v := range req.EnvVars {
			if k == "" || strings.ContainsAny(k, "=\x00") || strings.Contains(v, "\x00") {
				t.Fatalf("accepted env var %q=%q", k, v)
			}
		}
		if w := req.DefaultWorkdir; w != nil && *w != "" && (!filepath.IsAbs(*w) || filepath.Clean(*w) != *w) {
			t.Fatalf("accepted workdir %q", *w)
		}
	})
}

func FuzzVerifySignature(f *testing.F) {
	f.Add("/home/user/a.txt", "user", "token", int64(0), "")
	f.Add("", "", "t", int64(1700000000), "v1_abc")
	f.Add("p:q", "u:v", "x:y", int64(-5), "v1_")
	f.Fuzz(func(t *testing.T, path, user, token string, exp int64, forged string) {
		now := time.Unix(1_700_000_000, 0)
		q := url.Values{"path": {path}, "username": {user}}
		if exp != 0 {
			q.Set("signature_expiration", strconv.FormatInt(exp, 10))
		}
		q.Set("signature", Sign(path, SignRead, user, token, exp))
		err := VerifySignature(q, SignRead, token, now)
		switch {
		case exp != 0 && exp < now.Unix():
			if !errors.Is(err, ErrSignatureExpired) {
				t.Fatalf("expired signature: %v", err)
			}
		case err != nil:
			t.Fatalf("genuine signature rejected: %v", err)
		}
		if err := VerifySignature(q, SignWrite, token, now); err == nil {
			t.Fatal("read signature accepted for a write")
		}
		if forged != q.Get("signature") {
			q.Set("signature", forged)
			if err := VerifySignature(q, SignRead, token, now); err == nil {
				t.Fatalf("forged signature %q accepted", forged)
			}
		}
	})
}
