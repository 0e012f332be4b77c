package codeinterp

import (
	"bytes"
	"context"
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestPythonOutputs runs cells in one Python context and checks each output
// kind the SDK parses.
func TestPythonOutputs(t *testing.T) {
	needKernel(t, "pandas", "matplotlib")
	s := newTestServer(t, Options{})
	pngMagic := []byte("\x89PNG\r\n\x1a\n")
	tests := []struct {
		name  string
		code  string
		check func(t *testing.T, ex execution)
	}{
		{"expression", "1+1", func(t *testing.T, ex execution) {
			if got := ex.text(); got != "2" {
				t.Errorf("text = %q, want 2", got)
			}
			if n := ex.ofType(typeExecutions); len(n) != 1 {
				t.Errorf("number_of_executions events: %v", n)
			}
		}},
		{"repr'd string loses its quotes", "'abc'", func(t *testing.T, ex execution) {
			if got := ex.text(); got != "abc" {
				t.Errorf("text = %q, want abc", got)
			}
		}},
		{"no result for a statement", "y = 3", func(t *testing.T, ex execution) {
			if r := ex.ofType(typeResult); len(r) != 0 {
				t.Errorf("results for an assignment: %v", r)
			}
		}},
		{"stdout and stderr in order", "import sys\nprint('one', flush=True)\nsys.stderr.write('two\\n'); sys.stderr.flush()\nprint('three', flush=True)", func(t *testing.T, ex execution) {
			var seq []string
			for _, ev := range ex.events {
				if ev["type"] == typeStdout || ev["type"] == typeStderr {
					seq = append(seq, ev["type"].(string)+":"+strings.TrimSpace(ev["text"].(string)))
					if ts, _ := ev["timestamp"].(string); ts == "" {
						t.Errorf("stream event without timestamp: %v", ev)
					}
				}
			}
			if got, want := strings.Join(seq, " "), "stdout:one stderr:two stdout:three"; got != want {
				t.Errorf("streams %q, want %q", got, want)
			}
		}},
		{"exception", "def f():\n    return 1/0\nf()", func(t *testing.T, ex execution) {
			e := ex.err()
			if e == nil {
				t.Fatalf("no error event: %v", ex.events)
			}
			if e["name"] != "ZeroDivisionError" || e["value"] != "division by zero" {
				t.Errorf("error = %v", e)
			}
			tb, _ := e["traceback"].(string)
			if !strings.Contains(tb, "ZeroDivisionError") || !strings.Contains(tb, "return 1/0") {
				t.Errorf("traceback lacks the error and the line: %q", tb)
			}
			if strings.Contains(tb, "\x1b[") {
				t.Errorf("traceback has ANSI colors: %q", tb)
			}
			if len(ex.ofType(typeError)) != 1 {
				t.Errorf("error reported more than once: %v", ex.ofType(typeError))
			}
		}},
		{"pandas DataFrame as HTML", "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})", func(t *testing.T, ex execution) {
			r := ex.ofType(typeResult)
			if len(r) != 1 || r[0]["is_main_result"] != true {
				t.Fatalf("results: %v", ex.events)
			}
			if html, _ := r[0]["html"].(string); !strings.Contains(html, "<table") {
				t.Errorf("html = %q", html)
			}
			if txt, _ := r[0]["text"].(string); !strings.Contains(txt, "a  b") {
				t.Errorf("text = %q", txt)
			}
		}},
		{"matplotlib plot as PNG", "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()", func(t *testing.T, ex execution) {
			r := ex.ofType(typeResult)
			if len(r) != 1 || r[0]["is_main_result"] != false {
				t.Fatalf("want one display result: %v", ex.events)
			}
			png, err := base64.StdEncoding.DecodeString(r[0]["png"].(string))
			if err != nil || !bytes.HasPrefix(png, pngMagic) {
				t.Errorf("png is not a base64 PNG (%v)", err)
			}
		}},
		{"SVG, JSON, Markdown and LaTeX", "from IPython.display import display, SVG, JSON, Markdown, Latex\n" +
			"display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1\" height=\"1\"/>'))\n" +
			"display(JSON({'k': [1, 2]}))\ndisplay(Markdown('**bold**'))\ndisplay(Latex(r'$x^2$'))", func(t *testing.T, ex execution) {
			r := ex.ofType(typeResult)
			if len(r) != 4 {
				t.Fatalf("want 4 results: %v", ex.events)
			}
			if svg, _ := r[0]["svg"].(string); !strings.Contains(svg, "<svg") {
				t.Errorf("svg = %v", r[0])
			}
			if j, ok := r[1]["json"].(map[string]any); !ok || len(j["k"].([]any)) != 2 {
				t.Errorf("json = %v", r[1])
			}
			if md := r[2]["markdown"]; md != "**bold**" {
				t.Errorf("markdown = %v", r[2])
			}
			if tex := r[3]["latex"]; tex != "$x^2$" {
				t.Errorf("latex = %v", r[3])
			}
		}},
		{"unknown MIME type goes to extra", "from IPython.display import display\ndisplay({'application/x-custom': 'v', 'text/plain': 'p'}, raw=True)", func(t *testing.T, ex execution) {
			r := ex.ofType(typeResult)
			if len(r) != 1 {
				t.Fatalf("results: %v", ex.events)
			}
			extra, _ := r[0]["extra"].(map[string]any)
			if extra["application/x-custom"] != "v" || r[0]["text"] != "p" {
				t.Errorf("result = %v", r[0])
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ex := s.run(t, tt.code)
			tt.check(t, ex)
		})
	}
}

func TestPythonStateAndCounts(t *testing.T) {
	s := newTestServer(t, Options{})
	first := s.run(t, "x = 41").mustSucceed(t)
	second := s.run(t, "x + 1").mustSucceed(t)
	if second.text() != "42" {
		t.Fatalf("state lost between cells: %v", second.events)
	}
	c1 := first.ofType(typeExecutions)[0]["execution_count"].(float64)
	c2 := second.ofType(typeExecutions)[0]["execution_count"].(float64)
	if c2 != c1+1 {
		t.Errorf("execution counts %v then %v", c1, c2)
	}
	// The kernel looks like one ipykernel_launcher started: the cwd is
	// importable and cells run in __main__.
	if got := s.run(t, "import sys\n('' in sys.path, __name__)").text(); got != "(True, '__main__')" {
		t.Errorf("kernel environment: %s", got)
	}
	// Explicit "python" is the same default context.
	if got := s.exec(t, map[string]any{"code": "x", "language": "Python "}).text(); got != "41" {
		t.Errorf(`language "Python " did not reach the default context: %q`, got)
	}
}

func TestPythonEnvVars(t *testing.T) {
	s := newTestServer(t, Options{})
	s.run(t, "import os\nos.environ['KEEP'] = 'before'").mustSucceed(t)
	ex := s.exec(t, map[string]any{
		"code":     "print(os.environ['KEEP'], os.environ['NEW'], os.environ['Q'])",
		"env_vars": map[string]string{"KEEP": "during", "NEW": "x", "Q": `it's "quoted" \n`},
	}).mustSucceed(t)
	if got, want := ex.stream(typeStdout), "during x it's \"quoted\" \\n\n"; got != want {
		t.Errorf("stdout %q, want %q", got, want)
	}
	after := s.run(t, "print(os.environ.get('KEEP'), os.environ.get('NEW'), '_cubicle_saved_env' in dir(os))").mustSucceed(t)
	if got := after.stream(typeStdout); got != "before None False\n" {
		t.Errorf("environment after the cell: %q", got)
	}
	// Env vars reach subprocesses too.
	sub := s.exec(t, map[string]any{"code": "import subprocess\nprint(subprocess.run(['sh', '-c', 'echo $SUBV'], capture_output=True, text=True).stdout, end='')",
		"env_vars": map[string]string{"SUBV": "child"}}).mustSucceed(t)
	if got := sub.stream(typeStdout); got != "child\n" {
		t.Errorf("subprocess saw %q", got)
	}
	// A failing cell still gets its environment restored.
	s.exec(t, map[string]any{"code": "raise ValueError('x')", "env_vars": map[string]string{"NEW": "y"}})
	if got := s.run(t, "print(os.environ.get('NEW'))").stream(typeStdout); got != "None\n" {
		t.Errorf("NEW after a failed cell: %q", got)
	}
}

func TestContexts(t *testing.T) {
	s := newTestServer(t, Options{})
	dir := t.TempDir()
	a := s.newContext(t, map[string]any{"language": "python", "cwd": dir})
	b := s.newContext(t, nil)
	if a.Language != langPython || a.Cwd != dir || a.ID == "" || a.ID == b.ID {
		t.Fatalf("contexts %+v %+v", a, b)
	}
	t.Run("isolated", func(t *testing.T) {
		s.exec(t, map[string]any{"code": "v = 'a'", "context_id": a.ID}).mustSucceed(t)
		ex := s.exec(t, map[string]any{"code": "v", "context_id": b.ID})
		if e := ex.err(); e == nil || e["name"] != "NameError" {
			t.Errorf("v leaked into another context: %v", ex.events)
		}
	})
	t.Run("cwd", func(t *testing.T) {
		ex := s.exec(t, map[string]any{"code": "import os; os.getcwd()", "context_id": a.ID}).mustSucceed(t)
		if ex.text() != dir {
			t.Errorf("cwd %q, want %q", ex.text(), dir)
		}
	})
	t.Run("list", func(t *testing.T) {
		code, body := s.do(t, http.MethodGet, "/contexts")
		if code != http.StatusOK || !strings.Contains(body, a.ID) || !strings.Contains(body, b.ID) || !strings.Contains(body, `"language":"python"`) {
			t.Errorf("GET /contexts: %d %s", code, body)
		}
	})
	t.Run("restart", func(t *testing.T) {
		if code, body := s.do(t, http.MethodPost, "/contexts/"+a.ID+"/restart"); code != http.StatusNoContent {
			t.Fatalf("restart: %d %s", code, body)
		}
		ex := s.exec(t, map[string]any{"code": "v", "context_id": a.ID})
		if e := ex.err(); e == nil || e["name"] != "NameError" {
			t.Errorf("state survived a restart: %v", ex.events)
		}
		s.exec(t, map[string]any{"code": "1", "context_id": a.ID}).mustSucceed(t)
	})
	t.Run("delete", func(t *testing.T) {
		if code, body := s.do(t, http.MethodDelete, "/contexts/"+b.ID); code != http.StatusNoContent {
			t.Fatalf("delete: %d %s", code, body)
		}
		resp := s.post(t, "/execute", map[string]any{"code": "1", "context_id": b.ID})
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("execute in a deleted context: %s", resp.Status)
		}
		if code, _ := s.do(t, http.MethodDelete, "/contexts/"+b.ID); code != http.StatusNotFound {
			t.Errorf("second delete: %d", code)
		}
	})
}

// TestBadRequests checks the API's answers to what a client gets wrong.
func TestBadRequests(t *testing.T) {
	s := newTestServer(t, Options{})
	tests := []struct {
		method, path string
		body         string
		status       int
		contains     string
	}{
		{"POST", "/execute", `{"code":"1","context_id":"x","language":"python"}`, 400, "Only one of context_id or language"},
		{"POST", "/execute", `{"code":"1","context_id":"nope"}`, 404, "Context nope not found"},
		{"POST", "/execute", `{"code":"1","language":"cobol"}`, 400, "not supported"},
		{"POST", "/execute", `{"language":"python"}`, 400, "code is required"},
		{"POST", "/execute", `{"code":1}`, 400, "JSON"},
		{"POST", "/execute", `{"code":"1"} {}`, 400, "trailing"},
		{"POST", "/execute", `not json`, 400, "JSON"},
		{"POST", "/execute", `{"code":"1","env_vars":{"A=B":"c"}}`, 400, "invalid name"},
		{"POST", "/contexts", `{"cwd":"relative"}`, 400, "absolute"},
		{"POST", "/contexts", `{"cwd":"/does/not/exist"}`, 400, "does not exist"},
		{"POST", "/contexts", `{"language":"r"}`, 400, "not supported"},
		{"POST", "/contexts/nope/restart", ``, 404, "Context nope not found"},
		{"DELETE", "/contexts/nope", ``, 404, "Context nope not found"},
		{"GET", "/nothing", ``, 404, "no such endpoint"},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path+" "+tt.body, func(t *testing.T) {
			req, _ := http.NewRequest(tt.method, s.url+tt.path, strings.NewReader(tt.body))
			req.Header.Set("Content-Type", "application/json")
			resp, err := s.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var b bytes.Buffer
			b.ReadFrom(resp.Body)
			if resp.StatusCode != tt.status || !strings.Contains(b.String(), tt.contains) {
				t.Errorf("%d %q, want %d containing %q", resp.StatusCode, b.String(), tt.status, tt.contains)
			}
		})
	}
	// The server is still fine.
	if s.run(t, "2*3").text() != "6" {
		t.Error("server broken after bad requests")
	}
}

// TestInterruptOnDisconnect aborts a long cell from the client side and
// checks that the kernel was interrupted, not killed.
func TestInterruptOnDisconnect(t *testing.T) {
	s := newTestServer(t, Options{})
	s.run(t, "import time\nkept = 'yes'").mustSucceed(t)
	s.abandon(t, map[string]any{"code": "for i in range(60):\n    time.sleep(1)\nloop_done = True"})
	start := time.Now()
	ex := s.run(t, "kept, 'loop_done' in globals()").mustSucceed(t)
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("next cell waited %s: the interrupted cell went on running", took)
	}
	if ex.text() != "('yes', False)" {
		t.Errorf("after the interrupt: %q (want the state kept and the loop stopped)", ex.text())
	}
}

// TestIgnoredInterruptRestarts abandons cells that ignore SIGINT: after
// interruptLimit the context's process is replaced, state and all, and the
// context answers again.
func TestIgnoredInterruptRestarts(t *testing.T) {
	s := newTestServer(t, Options{})
	for _, tc := range []struct{ lang, setup, stubborn, probe string }{
		{langPython, "kept = 'yes'", "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)", "print(globals().get('kept', 'gone'))"},
		{langBash, "kept=yes", "trap '' INT; sleep 60", "echo ${kept:-gone}"},
	} {
		t.Run(tc.lang, func(t *testing.T) {
			t.Parallel()
			c := s.newContext(t, map[string]any{"language": tc.lang})
			s.exec(t, map[string]any{"code": tc.setup, "context_id": c.ID}).mustSucceed(t)
			s.abandon(t, map[string]any{"code": tc.stubborn, "context_id": c.ID})
			start := time.Now()
			ex := s.exec(t, map[string]any{"code": tc.probe, "context_id": c.ID}).mustSucceed(t)
			took := time.Since(start)
			if got := ex.stream(typeStdout); got != "gone\n" {
				t.Errorf("after the stubborn cell: %q, want the state gone with a new process", got)
			}
			if took < interruptLimit-time.Second || took > interruptLimit+20*time.Second {
				t.Errorf("the next cell ran after %s, want about %s", took, interruptLimit)
			}
		})
	}
}

func TestKeepalive(t *testing.T) {
	s := newTestServer(t, Options{})
	ex := s.run(t, "import time\ntime.sleep(1)").mustSucceed(t)
	if n := len(ex.ofType(typeKeepalive)); n < 2 {
		t.Errorf("%d keepalives in 1 s at a %s interval", n, s.keepalive)
	}
}

func TestHealth(t *testing.T) {
	needKernel(t)
	s := New(Options{Python: testPython, Cwd: t.TempDir()})
	defer s.Close()
	h := s.Handler()
	probe := func() (int, string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/health", nil))
		return rec.Code, rec.Body.String()
	}
	if code, _ := probe(); code != http.StatusServiceUnavailable {
		t.Errorf("health before Start: %d", code)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if code, body := probe(); code != http.StatusOK || strings.TrimSpace(body) != `"OK"` {
		t.Errorf("health after Start: %d %q", code, body)
	}
}

// TestConcurrentCells sends cells to one context at once; they must run one
// after another, each getting its own output.
func TestConcurrentCells(t *testing.T) {
	s := newTestServer(t, Options{})
	var wg sync.WaitGroup
	out := make([]string, 4)
	for i := range out {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ex := s.run(t, "import time\ntime.sleep(0.1)\nprint('"+string(rune('a'+i))+"')")
			out[i] = ex.stream(typeStdout)
		}()
	}
	wg.Wait()
	for i, got := range out {
		if want := string(rune('a'+i)) + "\n"; got != want {
			t.Errorf("cell %d printed %q, want %q", i, got, want)
		}
	}
}

func TestRestartDuringCell(t *testing.T) {
	s := newTestServer(t, Options{})
	c := s.newContext(t, nil)
	got := make(chan execution, 1)
	go func() { got <- s.exec(t, map[string]any{"code": "import time\ntime.sleep(30)", "context_id": c.ID}) }()
	time.Sleep(500 * time.Millisecond)
	if code, body := s.do(t, http.MethodPost, "/contexts/"+c.ID+"/restart"); code != http.StatusNoContent {
		t.Fatalf("restart: %d %s", code, body)
	}
	select {
	case ex := <-got:
		if e := ex.err(); e == nil || e["name"] != "ContextRestarting" {
			t.Errorf("running cell after restart: %v", ex.events)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("running cell did not end on restart")
	}
	s.exec(t, map[string]any{"code": "1", "context_id": c.ID}).mustSucceed(t)
}

func TestDeadKernelIsReplaced(t *testing.T) {
	s := newTestServer(t, Options{})
	ex := s.run(t, "import os\nos._exit(3)")
	if e := ex.err(); e == nil || e["name"] != "DeadKernelError" {
		t.Fatalf("cell that killed its kernel: %v", ex.events)
	}
	if s.run(t, "5").text() != "5" {
		t.Error("context unusable after its kernel died")
	}
}

func TestPreload(t *testing.T) {
	needKernel(t)
	s := newTestServer(t, Options{Preload: []string{"json", "no_such_module_xyz"}})
	ex := s.run(t, "import sys\n('json' in sys.modules, 'json' in dir())").mustSucceed(t)
	if ex.text() != "(True, False)" {
		t.Errorf("preload: %q (want imported but not in the namespace)", ex.text())
	}
	if n := ex.ofType(typeExecutions)[0]["execution_count"]; n != 1.0 {
		t.Errorf("first user cell is In[%v], want In[1]: preloading counted", n)
	}
}
