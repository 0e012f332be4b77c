// Package dockerfile turns a Dockerfile into an E2B template build
// (buildspec.Spec), for `cubicle template build -f Dockerfile`, and makes
// what the e2b SDK makes for each COPY: the filesHash of the copied files
// and the tar it uploads (see files.go).
//
// It follows the SDK's fromDockerfile where that defines the translation:
// one FROM (multi-stage builds are refused); the steps start with USER root
// and WORKDIR / and, if the Dockerfile sets neither, end with USER user and
// WORKDIR /home/user (E2B sandboxes run as "user"); every COPY/ADD source
// becomes its own COPY step, --chown its owner; ARG and ENV become ENV
// steps; CMD/ENTRYPOINT become the start command, with "sleep 20" as the
// ready command (the SDK's waitForTimeout(20_000)); EXPOSE and VOLUME are
// ignored.
//
// Where the SDK is loose, this parser follows Docker instead, and refuses
// what it cannot honour rather than building something else: quotes and
// escapes are processed as Docker does (the SDK splits `ENV A="x y"` into
// pieces); exec-form RUN/CMD are shell-quoted rather than joined with
// spaces; ENTRYPOINT and CMD combine as in Docker; --chmod becomes the COPY
// mode; HEALTHCHECK CMD becomes the ready command; SHELL applies to later
// shell-form RUNs; an unknown instruction, ADD of a URL or archive, COPY
// --from, RUN --mount and ONBUILD are errors naming their line.
//
// Variables: references in ENV, WORKDIR, USER and COPY destinations are
// kept for the builder to expand against the real environment (so ENV
// PATH=/opt/bin:$PATH sees the image's PATH); a COPY source and the FROM
// image must be known when the file is read (ARG defaults, build args, or
// earlier ENV values that are themselves known).
package dockerfile

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"

	"github.com/cubicle-dev/cubicle/template/buildspec"
)

// Error is a Dockerfile error with the line it is on.
type Error struct {
	Line int
	Msg  string
}

func (e *Error) Error() string { return fmt.Sprintf("%s on line %d", e.Msg, e.Line) }

// Options adjust a parse.
type Options struct {
	// BuildArgs override ARG defaults (docker build --build-arg).
	BuildArgs map[string]string
	// IsTemplate, if set, is asked about the FROM reference: true makes it
	// the build's fromTemplate (a cubicle template such as "base") rather
	// than an image.
	IsTemplate func(ref string) bool
}

// Result is a parsed Dockerfile. The COPY steps' FilesHash is empty until
// HashCopies fills it from a context directory.
type Result struct {
	Spec buildspec.Spec
	// Warnings name instructions that were accepted but have no effect.
	Warnings []string
}

// ReadyTimeoutCmd is the ready command the SDK gives a Dockerfile's
// CMD/ENTRYPOINT: waitForTimeout(20_000).
const ReadyTimeoutCmd = "sleep 20"

// variable is what the parser knows of an ARG or ENV variable.
type variable struct {
	val   string // literal value, when known
	set   bool
	known bool // false: the value depends on the base image's environment
}

type parser struct {
	opts     Options
	esc      byte
	res      Result
	vars     map[string]variable // in scope now
	preFrom  map[string]variable // ARGs declared before FROM
	from     bool
	userSet  bool
	wdSet    bool
	shell    []string // SHELL, nil for the default
	entry    *command
	cmd      *command
	readyCmd *string
}

// command is a CMD or ENTRYPOINT: exec form (args) or shell form (line).
type command struct {
	exec []string
	line string
	json bool
}

// Parse translates a Dockerfile.
func Parse(text []byte, opts Options) (Result, error) {
	lines, d, err := split(string(text))
	if err != nil {
		return Result{}, err
	}
	p := &parser{opts: opts, esc: d.escape, vars: map[string]variable{}, preFrom: map[string]variable{}}
	for _, l := range lines {
		if err := p.instruction(l); err != nil {
			if _, ok := err.(*Error); ok {
				return Result{}, err
			}
			return Result{}, &Error{Line: l.no, Msg: err.Error()}
		}
	}
	if !p.from {
		return Result{}, &Error{Line: max(1, len(strings.Split(string(text), "\n"))), Msg: "the Dockerfile has no FROM instruction"}
	}
	if !p.userSet {
		p.step(buildspec.User, "user")
	}
	if !p.wdSet {
		p.step(buildspec.Workdir, "/home/user")
	}
	if start := p.startCmd(); start != "" {
		p.res.Spec.StartCmd = start
		p.res.Spec.ReadyCmd = ReadyTimeoutCmd
	}
	if p.readyCmd != nil {
		p.res.Spec.ReadyCmd = *p.readyCmd
	}
	// What the parser makes must pass the server's validation; COPY
	// hashes are filled later, so check with a placeholder.
	check := p.res.Spec
	check.Steps = append([]buildspec.Step(nil), check.Steps...)
	for i := range check.Steps {
		if check.Steps[i].Type == buildspec.Copy {
			check.Steps[i].FilesHash = strings.Repeat("0", 64)
		}
	}
	if err := check.Validate(); err != nil {
		return Result{}, fmt.Errorf("the Dockerfile translates to an invalid build: %w", err)
	}
	return p.res, nil
}

func (p *parser) step(typ string, args ...string) {
	p.res.Spec.Steps = append(p.res.Spec.Steps, buildspec.Step{Type: typ, Args: args})
}

func (p *parser) warn(l line, format string, args ...any) {
	p.res.Warnings = append(p.res.Warnings, fmt.Sprintf("line %d: ", l.no)+fmt.Sprintf(format, args...))
}

func (p *parser) lookup(name string) (string, bool, bool) {
	v, ok := p.vars[name]
	if !ok {
		// Not declared in the Dockerfile: it could only come from the
		// base image, which the client does not see.
		return "", false, false
	}
	return v.val, v.set, v.known
}

// value evaluates a word for the parser's own bookkeeping: its literal
// value if every variable it uses is known.
func (p *parser) value(ps []piece) variable {
	v, err := literal(ps, p.lookup)
	if err != nil {
		return variable{}
	}
	return variable{val: v, set: true, known: true}
}

func (p *parser) instruction(l line) error {
	if !p.from && l.keyword != "FROM" && l.keyword != "ARG" {
		return &Error{Line: l.no, Msg: fmt.Sprintf("%s before FROM (only ARG may come before FROM)", l.keyword)}
	}
	switch l.keyword {
	case "FROM":
		return p.fromInstr(l)
	case "ARG":
		return p.argInstr(l)
	case "ENV":
		return p.envInstr(l)
	case "RUN":
		return p.runInstr(l)
	case "COPY", "ADD":
		return p.copyInstr(l)
	case "WORKDIR":
		ps, err := parseWord(l.rest, p.esc)
		if err != nil {
			return err
		}
		w := spec(ps)
		if strings.TrimSpace(w) == "" {
			return &Error{Line: l.no, Msg: "WORKDIR needs a path"}
		}
		p.step(buildspec.Workdir, w)
		p.wdSet = true
		return nil
	case "USER":
		fs, err := fields(l.rest, p.esc)
		if err != nil {
			return err
		}
		if len(fs) != 1 {
			return &Error{Line: l.no, Msg: "USER takes one user name"}
		}
		ps, err := parseWord(fs[0], p.esc)
		if err != nil {
			return err
		}
		p.step(buildspec.User, spec(ps))
		p.userSet = true
		return nil
	case "CMD", "ENTRYPOINT":
		c, err := p.commandOf(l)
		if err != nil {
			return err
		}
		if l.keyword == "CMD" {
			p.cmd = c
		} else {
			p.entry = c
			p.cmd = nil // Docker: ENTRYPOINT resets an earlier CMD
		}
		return nil
	case "HEALTHCHECK":
		return p.healthcheck(l)
	case "SHELL":
		args, ok := jsonArray(l.rest)
		if !ok || len(args) == 0 {
			return &Error{Line: l.no, Msg: `SHELL takes a JSON array, e.g. SHELL ["/bin/bash", "-c"]`}
		}
		p.shell = args
		return nil
	case "EXPOSE", "VOLUME":
		return nil // as the SDK: a sandbox exposes every port; no volumes in a template
	case "LABEL", "MAINTAINER", "STOPSIGNAL":
		p.warn(l, "%s has no effect on a sandbox template; ignored", l.keyword)
		return nil
	case "ONBUILD":
		return &Error{Line: l.no, Msg: "ONBUILD is not supported"}
	}
	return &Error{Line: l.no, Msg: fmt.Sprintf("unknown instruction %q", l.keyword)}
}

func (p *parser) fromInstr(l line) error {
	if p.from {
		return &Error{Line: l.no, Msg: "multi-stage builds are not supported: a second FROM"}
	}
	fs, err := fields(l.rest, p.esc)
	if err != nil {
		return err
	}
	var args []string
	for _, f := range fs {
		if strings.HasPrefix(f, "--") {
			name, val, _ := strings.Cut(f[2:], "=")
			if name != "platform" {
				return &Error{Line: l.no, Msg: fmt.Sprintf("FROM --%s is not supported", name)}
			}
			if val != "linux/amd64" && val != "$BUILDPLATFORM" && val != "$TARGETPLATFORM" && val != "${BUILDPLATFORM}" && val != "${TARGETPLATFORM}" {
				return &Error{Line: l.no, Msg: fmt.Sprintf("FROM --platform=%s is not supported (cubicle builds linux/amd64)", val)}
			}
			continue
		}
		args = append(args, f)
	}
	switch {
	case len(args) == 1:
	case len(args) == 3 && strings.EqualFold(args[1], "AS"):
	default:
		return &Error{Line: l.no, Msg: "FROM takes an image and optionally AS name"}
	}
	ps, err := parseWord(args[0], p.esc)
	if err != nil {
		return err
	}
	// Only ARGs declared before FROM are in scope for FROM.
	img, err := literal(ps, func(n string) (string, bool, bool) {
		v, ok := p.preFrom[n]
		if !ok {
			return "", false, false
		}
		return v.val, v.set, v.known
	})
	if err != nil {
		return &Error{Line: l.no, Msg: "FROM: " + err.Error()}
	}
	if img == "" {
		return &Error{Line: l.no, Msg: "FROM names no image"}
	}
	p.from = true
	if p.opts.IsTemplate != nil && p.opts.IsTemplate(img) {
		p.res.Spec.FromTemplate = img
	} else {
		p.res.Spec.FromImage = img
	}
	// As the SDK: start as root in /, whatever the image says.
	p.step(buildspec.User, "root")
	p.step(buildspec.Workdir, "/")
	return nil
}

func (p *parser) argInstr(l line) error {
	fs, err := fields(l.rest, p.esc)
	if err != nil {
		return err
	}
	if len(fs) == 0 {
		return &Error{Line: l.no, Msg: "ARG needs a name"}
	}
	var pairs []string
	for _, f := range fs {
		name, def, hasDef := strings.Cut(f, "=")
		if err := checkName(name); err != nil {
			return &Error{Line: l.no, Msg: "ARG: " + err.Error()}
		}
		// An ARG without a value is known to be unset, as in Docker (the
		// SDK would set it to "").
		v := variable{known: true}
		word := ""
		if bv, ok := p.opts.BuildArgs[name]; ok {
			v = variable{val: bv, set: true, known: true}
		} else if hasDef {
			ps, err := parseWord(def, p.esc)
			if err != nil {
				return err
			}
			if p.from {
				v = p.value(ps)
			} else {
				v, _ = p.preFromValue(ps)
			}
			if !v.known {
				word = spec(ps) // depends on the image's environment: the builder expands it
			}
		} else if prev, ok := p.preFrom[name]; ok && p.from {
			v = prev // ARG NAME after FROM brings a pre-FROM ARG into scope
		}
		if v.known {
			word = spec([]piece{{lit: v.val}})
		}
		if !p.from {
			p.preFrom[name] = v
			continue
		}
		p.vars[name] = v
		if v.set || !v.known {
			pairs = append(pairs, name, word)
		}
	}
	if len(pairs) > 0 {
		p.step(buildspec.Env, pairs...)
	}
	return nil
}

func (p *parser) preFromValue(ps []piece) (variable, error) {
	s, err := literal(ps, func(n string) (string, bool, bool) {
		v, ok := p.preFrom[n]
		if !ok {
			return "", false, false
		}
		return v.val, v.set, v.known
	})
	if err != nil {
		return variable{}, err
	}
	return variable{val: s, set: true, known: true}, nil
}

func (p *parser) envInstr(l line) error {
	fs, err := fields(l.rest, p.esc)
	if err != nil {
		return err
	}
	if len(fs) == 0 {
		return &Error{Line: l.no, Msg: "ENV needs a name and a value"}
	}
	var pairs []string
	next := map[string]variable{}
	if !strings.Contains(fs[0], "=") {
		// Legacy form: ENV NAME the rest of the line.
		name := fs[0]
		if len(fs) < 2 {
			return &Error{Line: l.no, Msg: fmt.Sprintf("ENV %s needs a value (ENV NAME value, or ENV NAME=value)", name)}
		}
		rest := strings.TrimLeft(strings.TrimPrefix(l.rest, name), " \t")
		ps, err := parseWord(rest, p.esc)
		if err != nil {
			return err
		}
		if err := checkName(name); err != nil {
			return &Error{Line: l.no, Msg: "ENV: " + err.Error()}
		}
		pairs = append(pairs, name, spec(ps))
		next[name] = p.value(ps)
	} else {
		for _, f := range fs {
			name, val, ok := strings.Cut(f, "=")
			if !ok {
				return &Error{Line: l.no, Msg: fmt.Sprintf("ENV %q has no value: write NAME=value", f)}
			}
			if err := checkName(name); err != nil {
				return &Error{Line: l.no, Msg: "ENV: " + err.Error()}
			}
			ps, err := parseWord(val, p.esc)
			if err != nil {
				return err
			}
			pairs = append(pairs, name, spec(ps))
			next[name] = p.value(ps) // against the state before this ENV, as Docker
		}
	}
	for k, v := range next {
		p.vars[k] = v
	}
	p.step(buildspec.Env, pairs...)
	return nil
}

func checkName(n string) error {
	if n == "" {
		return fmt.Errorf("a variable needs a name")
	}
	return buildspec.CheckEnvName(n)
}

// flags takes leading --name=value flags off a field list.
func flags(fs []string) (map[string]string, []string) {
	m := map[string]string{}
	for len(fs) > 0 && strings.HasPrefix(fs[0], "--") {
		name, val, _ := strings.Cut(fs[0][2:], "=")
		m[name] = val
		fs = fs[1:]
	}
	return m, fs
}

func (p *parser) runInstr(l line) error {
	rest := l.rest
	if strings.HasPrefix(rest, "--") {
		f, _, _ := strings.Cut(rest, " ")
		name, _, _ := strings.Cut(f[2:], "=")
		return &Error{Line: l.no, Msg: fmt.Sprintf("RUN --%s is not supported", name)}
	}
	var cmd string
	if args, ok := jsonArray(rest); ok {
		if len(args) == 0 {
			return &Error{Line: l.no, Msg: "RUN has an empty command"}
		}
		cmd = shellJoin(args) // exec form: no shell processing of the args
	} else {
		cmd = rest
		if len(l.heredoc) == 1 {
			h := l.heredoc[0]
			marker := strings.TrimSpace(cmd)
			if strings.HasPrefix(marker, "<<") && !strings.ContainsAny(strings.TrimLeft(marker[2:], "-\"'"+h.name), " \t|;&") {
				// RUN <<EOF alone: the body is the script (BuildKit).
				cmd = h.body
			} else {
				// The heredoc is the command's stdin; a shell does that.
				cmd = cmd + "\n" + h.body + h.name
			}
		}
		if strings.TrimSpace(cmd) == "" {
			return &Error{Line: l.no, Msg: "RUN has an empty command"}
		}
		if p.shell != nil {
			cmd = shellJoin(append(append([]string(nil), p.shell...), cmd))
		}
	}
	p.step(buildspec.Run, cmd)
	return nil
}

func (p *parser) copyInstr(l line) error {
	fs, err := fields(l.rest, p.esc)
	if err != nil {
		return err
	}
	fl, fs := flags(fs)
	owner, mode := "", ""
	for name, val := range fl {
		switch name {
		case "chown":
			ps, err := parseWord(val, p.esc)
			if err != nil {
				return err
			}
			owner = spec(ps)
		case "chmod":
			m, err := strconv.ParseUint(val, 8, 32)
			if err != nil || m > 0o7777 {
				return &Error{Line: l.no, Msg: fmt.Sprintf("%s --chmod=%s is not an octal mode like 755", l.keyword, val)}
			}
			mode = fmt.Sprintf("%04o", m)
		case "from":
			return &Error{Line: l.no, Msg: fmt.Sprintf("%s --from is not supported (multi-stage builds are not)", l.keyword)}
		case "link":
			// A layer-sharing hint for BuildKit; the copy is the same.
		default:
			return &Error{Line: l.no, Msg: fmt.Sprintf("%s --%s is not supported", l.keyword, name)}
		}
	}
	var raw []string
	rest := strings.TrimSpace(l.rest)
	for strings.HasPrefix(rest, "--") {
		_, rest, _ = strings.Cut(rest, " ")
		rest = strings.TrimSpace(rest)
	}
	if args, ok := jsonArray(rest); ok {
		// JSON form: no quote processing, but variables still apply.
		for _, a := range args {
			raw = append(raw, strings.ReplaceAll(strings.ReplaceAll(a, `\`, `\\`), `'`, `\'`))
		}
	} else {
		raw = fs
	}
	if len(raw) < 2 {
		return &Error{Line: l.no, Msg: l.keyword + " needs a source and a destination"}
	}
	dps, err := parseWord(raw[len(raw)-1], p.esc)
	if err != nil {
		return err
	}
	dest := spec(dps)
	srcs := raw[:len(raw)-1]
	if len(srcs) > 1 && !strings.HasSuffix(dest, "/") {
		return &Error{Line: l.no, Msg: fmt.Sprintf("%s with more than one source needs a destination directory ending in /", l.keyword)}
	}
	for _, s := range srcs {
		ps, err := parseWord(s, p.esc)
		if err != nil {
			return err
		}
		src, err := literal(ps, p.lookup)
		if err != nil {
			return &Error{Line: l.no, Msg: fmt.Sprintf("%s source: %v", l.keyword, err)}
		}
		if l.keyword == "ADD" {
			if isURL(src) {
				return &Error{Line: l.no, Msg: fmt.Sprintf("ADD of a URL (%s) is not supported; download it in a RUN step", src)}
			}
			if isArchive(src) {
				return &Error{Line: l.no, Msg: fmt.Sprintf("ADD of an archive (%s) is not supported (it would be unpacked); COPY it and unpack it in a RUN step", src)}
			}
		}
		if err := buildspec.CheckSource(src); err != nil {
			return &Error{Line: l.no, Msg: err.Error()}
		}
		p.step(buildspec.Copy, src, dest, owner, mode)
	}
	return nil
}

func isURL(s string) bool {
	l := strings.ToLower(s)
	for _, p := range []string{"http://", "https://", "git://", "git@", "ssh://", "ftp://"} {
		if strings.HasPrefix(l, p) {
			return true
		}
	}
	return false
}

func isArchive(s string) bool {
	l := strings.ToLower(s)
	for _, e := range []string{".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst"} {
		if strings.HasSuffix(l, e) {
			return true
		}
	}
	return false
}

// jsonArray parses s as a JSON array of strings (the exec form).
func jsonArray(s string) ([]string, bool) {
	s = strings.TrimSpace(s)
	if !strings.HasPrefix(s, "[") {
		return nil, false
	}
	var out []string
	if err := json.Unmarshal([]byte(s), &out); err != nil {
		return nil, false
	}
	return out, true
}

func (p *parser) commandOf(l line) (*command, error) {
	if args, ok := jsonArray(l.rest); ok {
		return &command{exec: args, json: true}, nil
	}
	if strings.TrimSpace(l.rest) == "" {
		return nil, &Error{Line: l.no, Msg: l.keyword + " needs a command"}
	}
	return &command{line: l.rest}, nil
}

// startCmd combines ENTRYPOINT and CMD as Docker does, as one shell line.
func (p *parser) startCmd() string {
	sh := p.shell
	if sh == nil {
		sh = []string{"/bin/sh", "-c"}
	}
	argv := func(c *command) []string {
		if c.json {
			return c.exec
		}
		return append(append([]string(nil), sh...), c.line)
	}
	switch {
	case p.entry != nil && !p.entry.json:
		return p.entry.line // shell-form ENTRYPOINT ignores CMD
	case p.entry != nil && p.cmd != nil:
		return shellJoin(append(append([]string(nil), p.entry.exec...), argv(p.cmd)...))
	case p.entry != nil:
		return shellJoin(p.entry.exec)
	case p.cmd != nil && p.cmd.json:
		return shellJoin(p.cmd.exec)
	case p.cmd != nil:
		return p.cmd.line
	}
	return ""
}

func (p *parser) healthcheck(l line) error {
	fs, err := fields(l.rest, p.esc)
	if err != nil {
		return err
	}
	fl, fs := flags(fs)
	if len(fl) > 0 {
		p.warn(l, "HEALTHCHECK options are ignored; the ready command is retried until it succeeds")
	}
	if len(fs) == 1 && strings.EqualFold(fs[0], "NONE") {
		none := ""
		p.readyCmd = &none
		return nil
	}
	if len(fs) < 2 || !strings.EqualFold(fs[0], "CMD") {
		return &Error{Line: l.no, Msg: "HEALTHCHECK takes CMD command or NONE"}
	}
	rest := l.rest
	for strings.HasPrefix(strings.TrimSpace(rest), "--") {
		_, rest, _ = strings.Cut(strings.TrimSpace(rest), " ")
	}
	rest = strings.TrimSpace(rest)
	rest = strings.TrimSpace(rest[len("CMD"):])
	c := rest
	if args, ok := jsonArray(rest); ok {
		if len(args) > 0 && (args[0] == "CMD-SHELL") {
			c = strings.Join(args[1:], " ")
		} else {
			c = shellJoin(args)
		}
	}
	p.readyCmd = &c
	return nil
}
