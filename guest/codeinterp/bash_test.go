package codeinterp

import (
	"net/http"
	"testing"
	"time"
)

func TestBash(t *testing.T) {
	s := newTestServer(t, Options{})
	dir := t.TempDir()
	c := s.newContext(t, map[string]any{"language": "bash", "cwd": dir})
	if c.Language != langBash || c.Cwd != dir {
		t.Fatalf("context %+v", c)
	}
	run := func(t *testing.T, code string, env map[string]string) execution {
		t.Helper()
		body := map[string]any{"code": code, "context_id": c.ID}
		if env != nil {
			body["env_vars"] = env
		}
		return s.exec(t, body)
	}
	tests := []struct {
		name  string
		code  string
		env   map[string]string
		check func(t *testing.T, ex execution)
	}{
		{"stdout", "echo hello", nil, func(t *testing.T, ex execution) {
			if got := ex.stream(typeStdout); got != "hello\n" {
				t.Errorf("stdout %q", got)
			}
		}},
		{"cwd", "pwd", nil, func(t *testing.T, ex execution) {
			if got := ex.stream(typeStdout); got != dir+"\n" {
				t.Errorf("pwd %q, want %q", got, dir)
			}
		}},
		{"state: variables, functions, declare, cd", "X=1; declare -A M=([k]=v); f() { echo \"f$1\"; }; cd /", nil, nil},
		{"state kept", "echo $X ${M[k]} $(f 2) $PWD", nil, func(t *testing.T, ex execution) {
			if got := ex.stream(typeStdout); got != "1 v f2 /\n" {
				t.Errorf("stdout %q", got)
			}
		}},
		{"stderr and exit status", "echo oops >&2; false", nil, func(t *testing.T, ex execution) {
			if got := ex.stream(typeStderr); got != "oops\n" {
				t.Errorf("stderr %q", got)
			}
			if e := ex.err(); e == nil || e["value"] != "1" {
				t.Errorf("error for exit status 1: %v", ex.events)
			}
		}},
		{"success has no error", "true", nil, func(t *testing.T, ex execution) {
			if e := ex.err(); e != nil {
				t.Errorf("error: %v", e)
			}
		}},
		{"multi-line, heredoc, no stdin", "cat <<EOF\na 'b' \"c\"\nEOF\nread -r line || echo no-stdin", nil, func(t *testing.T, ex execution) {
			if got := ex.stream(typeStdout); got != "a 'b' \"c\"\nno-stdin\n" {
				t.Errorf("stdout %q", got)
			}
		}},
		{"unicode split across writes", "printf '\\xc3'; sleep 0.1; printf '\\xa9\\n'", nil, func(t *testing.T, ex execution) {
			if got := ex.stream(typeStdout); got != "é\n" {
				t.Errorf("stdout %q", got)
			}
		}},
		{"env vars", `echo "$E1 $E2"`, map[string]string{"E1": "one", "E2": `it's $x`}, func(t *testing.T, ex execution) {
			if got := ex.stream(typeStdout); got != "one it's $x\n" {
				t.Errorf("stdout %q", got)
			}
		}},
		{"env vars gone, others restored", `echo "${E1:-unset}"; export E3=kept`, nil, func(t *testing.T, ex execution) {
			if got := ex.stream(typeStdout); got != "unset\n" {
				t.Errorf("stdout %q", got)
			}
		}},
		{"override then restore", `echo $E3`, map[string]string{"E3": "temp"}, func(t *testing.T, ex execution) {
			if got := ex.stream(typeStdout); got != "temp\n" {
				t.Errorf("stdout %q", got)
			}
		}},
		{"restored", `echo $E3`, nil, func(t *testing.T, ex execution) {
			if got := ex.stream(typeStdout); got != "kept\n" {
				t.Errorf("stdout %q", got)
			}
		}},
		{"invalid env name", `true`, map[string]string{"A-B": "x"}, func(t *testing.T, ex execution) {
			if e := ex.err(); e == nil || e["name"] != "InvalidEnvVar" {
				t.Errorf("events %v", ex.events)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ex := run(t, tt.code, tt.env)
			if tt.check == nil {
				ex.mustSucceed(t)
				return
			}
			tt.check(t, ex)
		})
	}

	t.Run("a cell that redirects its own output still ends", func(t *testing.T) {
		own := s.newContext(t, map[string]any{"language": "bash"})
		ex := s.exec(t, map[string]any{"code": "exec 3>&- >/dev/null; echo hidden", "context_id": own.ID}).mustSucceed(t)
		if got := ex.stream(typeStdout); got != "" {
			t.Errorf("stdout %q", got)
		}
		if got := s.exec(t, map[string]any{"code": "echo still >&2", "context_id": own.ID}).stream(typeStderr); got != "still\n" {
			t.Errorf("stderr %q", got)
		}
	})
	t.Run("counts", func(t *testing.T) {
		a := run(t, "true", nil).ofType(typeExecutions)[0]["execution_count"].(float64)
		b := run(t, "true", nil).ofType(typeExecutions)[0]["execution_count"].(float64)
		if b != a+1 {
			t.Errorf("counts %v, %v", a, b)
		}
	})
	t.Run("default bash context by language", func(t *testing.T) {
		ex := s.exec(t, map[string]any{"code": "Y=5", "language": "bash"}).mustSucceed(t)
		_ = ex
		if got := s.exec(t, map[string]any{"code": "echo ${Y:-none}", "language": "bash"}).stream(typeStdout); got != "5\n" {
			t.Errorf("default bash context lost state: %q", got)
		}
		if got := run(t, "echo ${Y:-none}", nil).stream(typeStdout); got != "none\n" {
			t.Errorf("contexts share state: %q", got)
		}
	})
}

func TestBashInterruptAndExit(t *testing.T) {
	s := newTestServer(t, Options{})
	c := s.newContext(t, map[string]any{"language": "bash"})
	s.exec(t, map[string]any{"code": "KEEP=yes", "context_id": c.ID}).mustSucceed(t)

	for _, code := range []string{
		"for i in $(seq 60); do sleep 1; done; LOOP=done", // a child in the foreground
		"while :; do :; done; LOOP=done",                  // builtins only
	} {
		s.abandon(t, map[string]any{"code": code, "context_id": c.ID})
		start := time.Now()
		got := s.exec(t, map[string]any{"code": "echo $KEEP ${LOOP:-stopped}", "context_id": c.ID}).stream(typeStdout)
		if got != "yes stopped\n" {
			t.Errorf("after interrupting %q: %q", code, got)
		}
		if took := time.Since(start); took > 5*time.Second {
			t.Errorf("interrupt of %q took %s", code, took)
		}
	}

	ex := s.exec(t, map[string]any{"code": "exit 4", "context_id": c.ID})
	if e := ex.err(); e == nil || e["name"] != "DeadKernelError" {
		t.Errorf("exit: %v", ex.events)
	}
	if got := s.exec(t, map[string]any{"code": "echo again", "context_id": c.ID}).stream(typeStdout); got != "again\n" {
		t.Errorf("after exit: %q", got)
	}
	if code, body := s.do(t, http.MethodPost, "/contexts/"+c.ID+"/restart"); code != http.StatusNoContent {
		t.Fatalf("restart: %d %s", code, body)
	}
	if got := s.exec(t, map[string]any{"code": "echo ${KEEP:-gone}", "context_id": c.ID}).stream(typeStdout); got != "gone\n" {
		t.Errorf("after restart: %q", got)
	}
}
