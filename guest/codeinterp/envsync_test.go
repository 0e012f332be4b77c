package codeinterp

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/guest/envd"
)

// TestSandboxEnvFromEnvd checks that the environment a sandbox was created
// with (envd's /init) reaches contexts whose kernels started before it, with
// the real envd serving /envs behind its access token.
func TestSandboxEnvFromEnvd(t *testing.T) {
	ed, err := envd.NewServer(envd.Options{
		RunDir:   "-",
		SetClock: func(time.Time) error { return nil },
		Logger:   slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	es := httptest.NewServer(ed.Handler())
	t.Cleanup(func() {
		es.Close()
		ed.Close(context.Background())
	})
	const token = "tok-123"
	s := newTestServer(t, Options{EnvdURL: es.URL})
	bash := s.newContext(t, map[string]any{"language": "bash"})

	initBody := `{"envVars":{"SBX_VAR":"from create"},"accessToken":"` + token + `"}`
	resp, err := http.Post(es.URL+"/init", "application/json", strings.NewReader(initBody))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("envd /init: %s", resp.Status)
	}

	execWith := func(t *testing.T, tok, body string) execution {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, s.url+"/execute", strings.NewReader(body))
		if tok != "" {
			req.Header.Set("X-Access-Token", tok)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(resp.Body)
			t.Fatalf("%s: %s", resp.Status, b)
		}
		return readExecution(t, resp.Body)
	}
	// Without the token envd refuses, and the cell runs without the
	// sandbox's variables rather than failing.
	if got := execWith(t, "", `{"code":"import os; str(os.environ.get('SBX_VAR'))"}`).mustSucceed(t).text(); got != "None" {
		t.Errorf("without a token: %q", got)
	}
	if got := execWith(t, token, `{"code":"os.environ.get('SBX_VAR')"}`).mustSucceed(t).text(); got != "from create" {
		t.Errorf("python: %q", got)
	}
	if got := execWith(t, token, `{"code":"echo $SBX_VAR","context_id":"`+bash.ID+`"}`).mustSucceed(t).stream(typeStdout); got != "from create\n" {
		t.Errorf("bash: %q", got)
	}
	later := s.newContext(t, nil)
	if got := execWith(t, "", `{"code":"import os; os.environ.get('SBX_VAR')","context_id":"`+later.ID+`"}`).mustSucceed(t).text(); got != "from create" {
		t.Errorf("context made after the sync: %q", got)
	}
	// A cell's own env_vars override and are undone; the sandbox's stay.
	body := `{"code":"print(os.environ['SBX_VAR'])","env_vars":{"SBX_VAR":"per cell"},"context_id":"` + later.ID + `"}`
	if got := execWith(t, "", body).stream(typeStdout); got != "per cell\n" {
		t.Errorf("override: %q", got)
	}
	if got := execWith(t, "", `{"code":"os.environ['SBX_VAR']","context_id":"`+later.ID+`"}`).text(); got != "from create" {
		t.Errorf("after override: %q", got)
	}
}
