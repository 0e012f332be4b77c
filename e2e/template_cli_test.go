package e2e

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/creack/pty"
	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/cubicle-dev/cubicle/client"
)

// cli runs the cubicle binary as a user of this server would (E2B_API_URL
// and E2B_API_KEY set), and returns its stdout, stderr and exit status.
func cli(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, srv.bin, args...)
	cmd.Env = srv.env()
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("cubicle %s: %v", strings.Join(args, " "), err)
	}
	t.Logf("$ cubicle %s\n%s%s", strings.Join(args, " "), out.String(), errOut.String())
	return out.String(), errOut.String(), cmd.ProcessState.ExitCode()
}

// cliTTY is cli with its stdout and stderr on a terminal 100 columns
// wide; it returns what the terminal received.
func cliTTY(t *testing.T, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, srv.bin, args...)
	cmd.Env = srv.env()
	tty, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 40, Cols: 100})
	if err != nil {
		t.Fatal(err)
	}
	defer tty.Close()
	var out bytes.Buffer
	io.Copy(&out, tty) // ends with EIO when the command exits
	err = cmd.Wait()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("cubicle %s: %v", strings.Join(args, " "), err)
	}
	t.Logf("$ cubicle %s (on a terminal)\n%q", strings.Join(args, " "), out.String())
	return out.String(), cmd.ProcessState.ExitCode()
}

// TestCLITemplates: `cubicle template build` builds a Dockerfile (FROM an
// image in a registry on loopback, a COPY from the context, a RUN) on the
// server with one progress line per step and the RUN's output kept out of
// sight; the template is listed, a sandbox made from it has the files,
// its log has the output; rm is refused while the sandbox lives and then
// removes it. A second build reuses the cached steps. A Dockerfile error
// fails with its line before anything reaches the server; a failing RUN
// exits 1 with the last lines of that step's output.
func TestCLITemplates(t *testing.T) {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatalf("busybox (static) is needed to make the test image: scripts/deps.sh --test installs it: %v", err)
	}
	reg := httptest.NewServer(registry.New())
	defer reg.Close()
	ref := strings.TrimPrefix(reg.URL, "http://") + "/e2e/busybox-cli:1"
	pushBusybox(t, bb, ref)

	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	write("notes.txt", "copied by the cli\n")
	good := write("Dockerfile", "FROM "+ref+`
COPY notes.txt /opt/app/
RUN echo built > /opt/app/built && \
    echo "run-output: $(cat /opt/app/notes.txt)"
ENV GREETING=hello
`)
	out, errOut, code := cli(t, "template", "build", "-f", good, "-n", "cli-app")
	if code != 0 {
		t.Fatalf("build: exit %d\n%s%s", code, out, errOut)
	}
	if !regexp.MustCompile(`(?m)^template cli-app \(\w+\) ready$`).MatchString(out) {
		t.Errorf("build: no 'template cli-app (ID) ready' line:\n%s", out)
	}
	for _, want := range []string{"RUN echo built > /opt/app/built && echo", "done in", "COPY notes.txt /opt/app/", "1 uploaded"} {
		if !strings.Contains(out, want) {
			t.Errorf("build output lacks %q:\n%s", want, out)
		}
	}
	// Not a terminal: plain lines, and the steps' output is kept, not shown.
	if strings.ContainsAny(out, "\x1b\r") || strings.Contains(out, "run-output: copied") {
		t.Errorf("build output on a pipe has escape codes or the RUN's output:\n%q", out)
	}

	out, _, code = cli(t, "template", "list")
	if code != 0 || !regexp.MustCompile(`(?m)^\w+\s+cli-app\s+\d+\s+\d+\s+\S+`).MatchString(out) {
		t.Errorf("list: exit %d, no cli-app row:\n%s", code, out)
	}
	out, _, code = cli(t, "template", "logs", "cli-app")
	if code != 0 || !strings.Contains(out, "run-output: copied by the cli") || !strings.Contains(out, ": ready") {
		t.Errorf("logs: exit %d, no RUN output or no ready:\n%s", code, out)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := srv.client()
	sb, err := c.Create(ctx, "cli-app", client.CreateOptions{Timeout: 5 * time.Minute})
	if err != nil {
		t.Fatalf("create from cli-app: %v", err)
	}
	var stdout, stderr bytes.Buffer
	exit, err := c.Run(ctx, sb, "cat /opt/app/notes.txt /opt/app/built; echo $GREETING", &stdout, &stderr)
	if err != nil || exit != 0 || stdout.String() != "copied by the cli\nbuilt\nhello\n" {
		t.Errorf("in the sandbox: exit %d, %v: %q %q", exit, err, stdout.String(), stderr.String())
	}
	// The API's 409, as the server words it.
	_, errOut, code = cli(t, "template", "rm", "cli-app")
	if code != 1 || !strings.Contains(errOut, "cli-app: the template is in use") {
		t.Errorf("rm while a sandbox uses it: exit %d: %s", code, errOut)
	}
	if err := c.Kill(ctx, sb.SandboxID); err != nil {
		t.Fatal(err)
	}

	// Built again, on a terminal: the steps up to the RUN come from the
	// cache, the files are not sent again, and each step is a line
	// redrawn in place that ends with ✓ (the RUN's output still hidden).
	raw, code := cliTTY(t, "template", "build", "-f", good, "-n", "cli-app")
	if code != 0 || !regexp.MustCompile(`\[\d+/\d+\] RUN echo built[^\n]*\x1b\[2mcached`).MatchString(raw) || !strings.Contains(raw, "1 already on the server") {
		t.Errorf("second build: exit %d, RUN step not cached or files uploaded again:\n%q", code, raw)
	}
	if !regexp.MustCompile(`\r\x1b\[K\[\d+/\d+\] ENV GREETING hello [⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] \d+s`).MatchString(raw) ||
		!regexp.MustCompile(`\r\x1b\[K\[\d+/\d+\] ENV GREETING hello \x1b\[32m✓ \d+\.\ds`).MatchString(raw) ||
		!regexp.MustCompile(`(?m)^template cli-app \(\w+\) ready\r?$`).MatchString(raw) || strings.Contains(raw, "run-output: copied") {
		t.Errorf("second build on a terminal: no step line redrawn in place, or no ready line:\n%q", raw)
	}
	out, errOut, code = cli(t, "template", "rm", "cli-app")
	if code != 0 || strings.TrimSpace(out) != "removed cli-app" {
		t.Errorf("rm: exit %d: %s%s", code, out, errOut)
	}
	if out, _, _ = cli(t, "template", "list"); strings.Contains(out, "cli-app") {
		t.Errorf("cli-app listed after rm:\n%s", out)
	}

	// Ctrl-C stops following, not the build: logs -f then follows it to
	// its end.
	slow := write("Dockerfile.slow", "FROM "+ref+"\nRUN echo slow-start; sleep 4; echo slow-end\n")
	cmd := exec.Command(srv.bin, "template", "build", "-f", slow, "-n", "cli-slow")
	cmd.Env = srv.env()
	var slowOut, slowErr syncBuffer
	cmd.Stdout, cmd.Stderr = &slowOut, &slowErr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(2 * time.Minute); !strings.Contains(slowOut.String(), "RUN echo slow-start") && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	cmd.Process.Signal(os.Interrupt)
	err = cmd.Wait()
	t.Logf("build interrupted: %v\n%s%s", err, slowOut.String(), slowErr.String())
	if cmd.ProcessState.ExitCode() != 1 || !strings.Contains(slowErr.String(), "stopped following; the build goes on on the server: cubicle template logs") {
		t.Errorf("Ctrl-C: exit %d: %s", cmd.ProcessState.ExitCode(), slowErr.String())
	}
	out, _, code = cli(t, "template", "logs", "cli-slow", "-f")
	if code != 0 || !strings.Contains(out, "] slow-end") || !strings.Contains(out, ": ready") {
		t.Errorf("logs -f after Ctrl-C: exit %d:\n%s", code, out)
	}
	cli(t, "template", "rm", "cli-slow")

	// A Dockerfile error: its line, and nothing on the server.
	bad := write("Dockerfile.bad", "FROM "+ref+"\nRUN true\nFROBNICATE x\n")
	out, errOut, code = cli(t, "template", "build", "-f", bad, "-n", "cli-bad")
	if code != 1 || !strings.Contains(errOut, "Dockerfile.bad:3: unknown instruction \"FROBNICATE\"") || out != "" {
		t.Errorf("bad Dockerfile: exit %d: %q %q", code, out, errOut)
	}
	if _, err := c.Template(ctx, "cli-bad"); err == nil {
		t.Error("a template with builds exists after a Dockerfile error")
	}

	// A failing RUN: exit 1, the step's reason, and its last lines.
	failing := write("Dockerfile.fail", "FROM "+ref+"\nRUN echo first-line; echo last-line; exit 3\n")
	out, errOut, code = cli(t, "template", "build", "-f", failing, "-n", "cli-fail")
	if code != 1 || !regexp.MustCompile(`build failed at \[\d+/\d+\]: RUN .*exited with status 3`).MatchString(errOut) {
		t.Errorf("failing RUN: exit %d, no reason with its step: %s", code, errOut)
	}
	if !strings.Contains(out, "failed after") || !strings.Contains(out, "  first-line\n  last-line\n") {
		t.Errorf("failing RUN: no failed step or no tail of its output:\n%s", out)
	}
	out, _, code = cli(t, "template", "logs", "cli-fail")
	if code != 0 || !strings.Contains(out, "exited with status 3") {
		t.Errorf("logs of a failed build: exit %d:\n%s", code, out)
	}
}
