package codeinterp

import (
	"io"
	"net/http"
	"strings"
	"testing"
)

// TestSandboxEnvFromEnvd checks that the environment a sandbox was created
// with (envd's /init) reaches contexts whose kernels started before it, with
// the real envd serving /envs behind its access token.
func TestSandboxEnvFromEnvd(t *testing.T) {
	e := startEnvd(t)
	// The default Python kernel starts here, before /init, as in a pooled
	// sandbox.
	s := newTestServer(t, Options{EnvdURL: e.url})
	s.token = newToken(t)
	e.init(t, s.token, map[string]string{"SBX_VAR": "from create"})
	bash := s.newContext(t, map[string]any{"language": "bash"})

	execWith := func(t *testing.T, body string) execution {
		t.Helper()
		resp, err := s.client.Post(s.url+"/execute", "application/json", strings.NewReader(body))
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
	if got := execWith(t, `{"code":"import os; os.environ.get('SBX_VAR')"}`).mustSucceed(t).text(); got != "from create" {
		t.Errorf("python: %q", got)
	}
	if got := execWith(t, `{"code":"echo $SBX_VAR","context_id":"`+bash.ID+`"}`).mustSucceed(t).stream(typeStdout); got != "from create\n" {
		t.Errorf("bash: %q", got)
	}
	later := s.newContext(t, nil)
	if got := execWith(t, `{"code":"import os; os.environ.get('SBX_VAR')","context_id":"`+later.ID+`"}`).mustSucceed(t).text(); got != "from create" {
		t.Errorf("context made after the sync: %q", got)
	}
	// A cell's own env_vars override and are undone; the sandbox's stay.
	body := `{"code":"print(os.environ['SBX_VAR'])","env_vars":{"SBX_VAR":"per cell"},"context_id":"` + later.ID + `"}`
	if got := execWith(t, body).stream(typeStdout); got != "per cell\n" {
		t.Errorf("override: %q", got)
	}
	if got := execWith(t, `{"code":"os.environ['SBX_VAR']","context_id":"`+later.ID+`"}`).text(); got != "from create" {
		t.Errorf("after override: %q", got)
	}
}
