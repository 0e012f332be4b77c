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
package codeinterp
