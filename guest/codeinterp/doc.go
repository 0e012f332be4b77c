// Package codeinterp is the code interpreter that runs inside sandboxes of the
// code-interpreter-v1 template: the HTTP server on port 49999 that the
// @e2b/code-interpreter SDKs talk to (shared/e2b-protocol.md §4), and the
// kernels it drives.
//
// A context is one stateful interpreter. Python contexts are real ipykernel
// processes spoken to over the Jupyter messaging protocol on ZeroMQ (shell and
// iopub channels, HMAC-SHA256 signed, over ipc sockets in a private directory),
// so rich output (pandas HTML, matplotlib PNG, SVG, JSON, LaTeX, Markdown)
// comes out exactly as Jupyter would show it. Bash contexts are one persistent
// interactive bash per context driven through pipes: Debian packages no bash
// kernel, and bash itself already keeps the state a context promises
// (variables, functions, working directory). See bash.go for how a cell's end
// and exit status are found without mixing markers into user output.
//
// POST /execute streams one JSON object per line: number_of_executions,
// stdout/stderr, result, error, a keepalive every 5 s while nothing else is
// sent, and always end_of_execution last. When the client goes away (an abort
// or the SDK's timeout) the execution is interrupted with SIGINT to the
// kernel's process group, as jupyter_client does, and the context stays
// usable; a kernel that ignores interrupts is restarted instead.
//
// The server starts the default Python context before it answers GET /health,
// so a template whose ready command polls /health hands out sandboxes whose
// first runCode pays no kernel start-up.
//
// # Who may use it
//
// Port 49999 is reachable through the proxy by anyone who knows the sandbox's
// id, and ids show up in host names and logs, so the server demands what
// envd demands: the sandbox's access token in X-Access-Token, which the SDKs
// send with POST /execute. Only GET /health is open (the template's ready
// command polls it).
//
// The token does not exist when the server starts: the template's start
// command runs in a pooled sandbox, and envd's /init gives the sandbox its
// token only when it is handed out. Rather than receive a copy (a file or a
// socket envd writes to, which must then be guarded, kept in step across a
// second /init, and kept out of snapshots), the server asks envd, on
// loopback, whether a presented token is the one (envd's GET /auth: 204, 401,
// or 503 while it has none). envd stays the only holder of the secret and
// compares in constant time; a token changed by a later /init counts at
// once; and a server started by any user, before or after /init, needs
// nothing from the template. The cost is one loopback request per call,
// small beside a cell.
//
// While envd has no token (a pooled sandbox) every request but /health is
// refused: 401 without a token, 503 "Authentication unavailable" with one.
// If envd cannot be asked at all the answer is also 503: it fails closed.
//
// The SDKs (JS 2.8, Python alike) send no token with their context calls
// (create, list, restart, remove); those are admitted without one once the
// sandbox is handed out, and refused with a wrong one. They manage kernels
// but run no code: a context runs code only through POST /execute.
//
// POST, PUT and PATCH must carry Content-Type application/json (415
// otherwise). The SDKs always send it; a web page cannot send it cross-site
// without a CORS preflight, which this server never grants, so a page a user
// visits cannot drive the interpreter with a "simple" text/plain or form POST.
// Refusals are plain text, like the server's other errors, and not cached.
package codeinterp
