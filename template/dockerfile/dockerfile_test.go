package dockerfile

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/cubicle-dev/cubicle/template/buildspec"
)

// steps renders a spec's steps compactly: TYPE arg|arg|...
func steps(s buildspec.Spec) []string {
	var out []string
	for _, st := range s.Steps {
		out = append(out, st.Type+" "+strings.Join(st.Args, "|"))
	}
	return out
}

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name       string
		df         string
		opts       Options
		from       string
		tmpl       string
		want       []string // steps between the SDK's leading USER root/WORKDIR / and the trailing defaults
		start      string
		ready      string
		defaultsOn bool // expect the trailing USER user / WORKDIR /home/user
	}{
		{
			name: "basic",
			df: `FROM python:3.12
RUN pip install flask
COPY app.py /app/
CMD ["python", "/app/app.py"]
`,
			from:       "python:3.12",
			want:       []string{"RUN pip install flask", "COPY app.py|/app/||"},
			start:      "python /app/app.py",
			ready:      ReadyTimeoutCmd,
			defaultsOn: true,
		},
		{
			name:       "directives, comments, continuations, case",
			df:         "# syntax=docker/dockerfile:1\n# escape=`\n\n# a comment\nfrom alpine AS base\nrun echo a `\n  # inside\n  && echo b\n",
			from:       "alpine",
			want:       []string{"RUN echo a   && echo b"},
			defaultsOn: true,
		},
		{
			name: "backslash continuation keeps the next line's indent",
			df:   "FROM a\nRUN apt-get update && \\\n    apt-get install -y curl\n",
			from: "a",
			want: []string{"RUN apt-get update &&     apt-get install -y curl"}, defaultsOn: true,
		},
		{
			name: "ENV forms, quotes and references",
			df: `FROM a
ENV A=1 B="two words" C='$lit' D=\$x E=${A}-$A
ENV LEGACY three words here
ENV PATH=/opt/bin:$PATH
`,
			from: "a",
			want: []string{
				`ENV A|1|B|two words|C|\$lit|D|\$x|E|${A}-${A}`,
				"ENV LEGACY|three words here",
				"ENV PATH|/opt/bin:${PATH}",
			},
			defaultsOn: true,
		},
		{
			name: "ARG defaults, build args, substitution into COPY sources",
			df: `ARG TAG=3.12
FROM python:${TAG}
ARG TAG
ARG DIR=src
ARG NOVAL
ARG OVER=a
COPY ${DIR}/x ${DIR:-y}/
COPY ${NOVAL:-dflt}.txt /d/
`,
			opts:       Options{BuildArgs: map[string]string{"OVER": "b$c"}},
			from:       "python:3.12",
			want:       []string{"ENV TAG|3.12", "ENV DIR|src", `ENV OVER|b\$c`, "COPY src/x|${DIR:-y}/||", "COPY dflt.txt|/d/||"},
			defaultsOn: true,
		},
		{
			name: "COPY flags, several sources, JSON form, ADD of a local file",
			df: `FROM a
COPY --chown=app:app --chmod=755 a.txt b.txt /dst/
COPY ["with space.txt", "/x y/"]
ADD --chown=1000 conf /etc/conf
COPY --link c /c
`,
			from:       "a",
			want:       []string{"COPY a.txt|/dst/|app:app|0755", "COPY b.txt|/dst/|app:app|0755", "COPY with space.txt|/x y/||", "COPY conf|/etc/conf|1000|", "COPY c|/c||"},
			defaultsOn: true,
		},
		{
			name: "exec-form RUN is shell-quoted, SHELL wraps shell form",
			df: `FROM a
RUN ["bash", "-c", "echo 'hi there' $HOME"]
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN curl x | sh
`,
			from:       "a",
			want:       []string{`RUN bash -c 'echo '\''hi there'\'' $HOME'`, `RUN /bin/bash -o pipefail -c 'curl x | sh'`},
			defaultsOn: true,
		},
		{
			name: "heredocs",
			df:   "FROM a\nRUN <<EOF\necho one\necho two\nEOF\nRUN python3 <<-'PY'\n\tprint(1)\n\tPY\n",
			from: "a",
			want: []string{"RUN echo one\necho two\n", "RUN python3 <<-'PY'\nprint(1)\nPY"}, defaultsOn: true,
		},
		{
			name: "USER and WORKDIR set turn the defaults off",
			df:   "FROM a\nWORKDIR /srv/$APP\nUSER node\nEXPOSE 80\nVOLUME /data\n",
			from: "a",
			want: []string{"WORKDIR /srv/${APP}", "USER node"},
		},
		{
			name:       "ENTRYPOINT and CMD combine",
			df:         "FROM a\nCMD [\"--port\", \"80\"]\nENTRYPOINT [\"server\", \"--x\"]\nCMD [\"--port\", \"8080\"]\n",
			from:       "a",
			start:      "server --x --port 8080",
			ready:      ReadyTimeoutCmd,
			defaultsOn: true,
		},
		{
			name:       "shell-form ENTRYPOINT ignores CMD; HEALTHCHECK is the ready command",
			df:         "FROM a\nENTRYPOINT node server.js\nCMD [\"x\"]\nHEALTHCHECK --interval=5s CMD curl -f http://localhost/\n",
			from:       "a",
			start:      "node server.js",
			ready:      "curl -f http://localhost/",
			defaultsOn: true,
		},
		{
			name:       "shell-form CMD after exec ENTRYPOINT goes through sh -c",
			df:         "FROM a\nENTRYPOINT [\"tini\", \"--\"]\nCMD echo $HOME\n",
			from:       "a",
			start:      "tini -- /bin/sh -c 'echo $HOME'",
			ready:      ReadyTimeoutCmd,
			defaultsOn: true,
		},
		{
			name:       "FROM a cubicle template",
			df:         "FROM base\nRUN true\n",
			opts:       Options{IsTemplate: func(r string) bool { return r == "base" }},
			tmpl:       "base",
			want:       []string{"RUN true"},
			defaultsOn: true,
		},
		{
			name: "platform flag",
			df:   "FROM --platform=linux/amd64 a\n",
			from: "a", defaultsOn: true,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := Parse([]byte(tc.df), tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			s := r.Spec
			if s.FromImage != tc.from || s.FromTemplate != tc.tmpl {
				t.Errorf("from %q/%q, want %q/%q", s.FromImage, s.FromTemplate, tc.from, tc.tmpl)
			}
			got := steps(s)
			if len(got) < 2 || got[0] != "USER root" || got[1] != "WORKDIR /" {
				t.Fatalf("steps do not start as the SDK's: %q", got)
			}
			got = got[2:]
			if tc.defaultsOn {
				n := len(got)
				if n < 2 || got[n-2] != "USER user" || got[n-1] != "WORKDIR /home/user" {
					t.Fatalf("steps do not end with the defaults: %q", got)
				}
				got = got[:n-2]
			}
			if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Errorf("steps\n%q\nwant\n%q", got, tc.want)
			}
			if s.StartCmd != tc.start || s.ReadyCmd != tc.ready {
				t.Errorf("start %q ready %q, want %q %q", s.StartCmd, s.ReadyCmd, tc.start, tc.ready)
			}
		})
	}
}

// TestParseEnvMeaning checks that what the parser writes means, once the
// builder expands it (buildspec.State), what Docker would give.
func TestParseEnvMeaning(t *testing.T) {
	r, err := Parse([]byte(`FROM a
ARG V=1.0
ENV A=x B="two words" C='$HOME' D=\$HOME E="${V}-$HOME" F=a\\b G="q\"q"
ENV PATH=/opt/bin:$PATH
ENV H=$A
`), Options{})
	if err != nil {
		t.Fatal(err)
	}
	st := buildspec.State{Env: []buildspec.EnvVar{{Name: "HOME", Value: "/root"}, {Name: "PATH", Value: "/usr/bin"}}}
	for _, step := range r.Spec.Steps {
		if st, err = st.Apply(step); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string]string{"V": "1.0", "A": "x", "B": "two words", "C": "$HOME", "D": "$HOME", "E": "1.0-/root", "F": `a\b`, "G": `q"q`, "PATH": "/opt/bin:/usr/bin", "H": "x"}
	for k, v := range want {
		if got, _ := st.Lookup(k); got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
}

func TestParseRefuses(t *testing.T) {
	for _, tc := range []struct{ df, want string }{
		{"FROM a\nFOO bar\n", `unknown instruction "FOO" on line 2`},
		{"FROM a\n\n# c\nRUN x\nBOGUS\n", `unknown instruction "BOGUS" on line 5`},
		{"FROM a AS one\nRUN x\nFROM b\n", "multi-stage builds are not supported: a second FROM on line 3"},
		{"RUN x\n", "RUN before FROM (only ARG may come before FROM) on line 1"},
		{"# just a comment\n", "no FROM instruction"},
		{"FROM a\nADD https://example.com/x.tgz /x\n", "ADD of a URL (https://example.com/x.tgz) is not supported; download it in a RUN step on line 2"},
		{"FROM a\nADD stuff.tar.gz /x\n", "ADD of an archive (stuff.tar.gz) is not supported"},
		{"FROM a\nCOPY --from=build /a /b\n", "COPY --from is not supported"},
		{"FROM a\nCOPY --exclude=x a /b\n", "COPY --exclude is not supported"},
		{"FROM a\nCOPY --chmod=99 a /b\n", "not an octal mode"},
		{"FROM a\nCOPY a b c\n", "destination directory ending in /"},
		{"FROM a\nCOPY a\n", "needs a source and a destination"},
		{"FROM a\nCOPY ../x /b\n", "escapes the context directory on line 2"},
		{"FROM a\nCOPY /etc/passwd /b\n", "absolute"},
		{"FROM a\nCOPY $UNKNOWN /b\n", "$UNKNOWN is not known when the Dockerfile is read"},
		{"FROM a\nRUN --mount=type=cache,target=/x make\n", "RUN --mount is not supported on line 2"},
		{"FROM a\nONBUILD RUN x\n", "ONBUILD is not supported"},
		{"FROM --platform=linux/arm64 a\n", "--platform=linux/arm64 is not supported"},
		{"FROM $IMG\n", "$IMG is not known"},
		{"FROM a\nENV A\n", "needs a value"},
		{"FROM a\nENV A=1 B\n", `ENV "B" has no value`},
		{"FROM a\nENV A=\"x\n", "unterminated"},
		{"FROM a\nRUN <<EOF\necho\n", "heredoc <<EOF is not closed"},
		{"FROM a\nCOPY <<EOF /x\nhi\nEOF\n", "COPY with a heredoc is not supported"},
		{"FROM a\nSHELL /bin/bash\n", "SHELL takes a JSON array"},
		{"FROM a\nUSER a b\n", "USER takes one user name"},
		{"FROM a\nWORKDIR\n", "WORKDIR needs a path"},
		{"FROM a\nCMD\n", "CMD needs a command"},
		{"# escape=x\nFROM a\n", "escape directive"},
		{"FROM a\nENV A=${B/x/y}\n", "unsupported substitution"},
		{"FROM a\nRUN\n", "RUN has an empty command"},
	} {
		_, err := Parse([]byte(tc.df), Options{})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q) = %v, want %q", tc.df, err, tc.want)
		}
	}
}

func TestParseWarnings(t *testing.T) {
	r, err := Parse([]byte("FROM a\nLABEL x=y\nHEALTHCHECK --interval=1s CMD true\n"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Warnings) != 2 || !strings.HasPrefix(r.Warnings[0], "line 2: LABEL") {
		t.Fatalf("warnings %q", r.Warnings)
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"FROM a\nRUN x\n",
		"# escape=`\nFROM a\nRUN a `\n b\n",
		"ARG T=1\nFROM a:${T}\nENV A=\"b c\" D=${T:-x}\nCOPY --chown=u:g a b /c/\nCMD [\"x\"]\n",
		"FROM a\nRUN <<EOF\nx\nEOF\n",
		"FROM a\nENV A='${' B=\"$\" C=\\\n",
		"FROM a\nHEALTHCHECK CMD [\"CMD-SHELL\", \"true\"]\nSHELL [\"sh\",\"-c\"]\nRUN x\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, df []byte) {
		r, err := Parse(df, Options{})
		if err != nil {
			return
		}
		// A parsed Dockerfile, with its COPY hashes filled, is a valid
		// build request, and the server's step semantics can run it.
		s := r.Spec
		for i := range s.Steps {
			if s.Steps[i].Type == buildspec.Copy {
				s.Steps[i].FilesHash = strings.Repeat("a", 64)
			}
		}
		body, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := buildspec.Parse(body); err != nil {
			t.Fatalf("parsed Dockerfile makes an invalid build: %v\n%s", err, df)
		}
		var st buildspec.State
		for _, step := range s.Steps {
			if next, err := st.Apply(step); err == nil {
				st = next
			}
		}
	})
}
