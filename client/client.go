// Package client is a small Go client of a cubicle (or E2B) server: the
// control-plane calls the CLI and the benchmarks need, and commands run in a
// sandbox through the proxy with the same wire format the E2B SDKs use
// (Connect protocol, JSON codec).
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/cubicle-dev/cubicle/guest/envd/gen/process"
	"github.com/cubicle-dev/cubicle/guest/envd/gen/process/processconnect"
)

// EnvdPort is envd's port inside a sandbox.
const EnvdPort = 49983

// Client talks to one server.
type Client struct {
	APIURL     string
	SandboxURL string
	APIKey     string
	HTTP       *http.Client
}

// New returns a client with a transport tuned for many short requests.
func New(apiURL, sandboxURL, apiKey string) *Client {
	return &Client{
		APIURL:     strings.TrimRight(apiURL, "/"),
		SandboxURL: strings.TrimRight(sandboxURL, "/"),
		APIKey:     apiKey,
		HTTP: &http.Client{Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
			MaxIdleConnsPerHost: 256,
			IdleConnTimeout:     90 * time.Second,
		}},
	}
}

// Error is an API error in E2B's shape.
type Error struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return fmt.Sprintf("%d: %s", e.Code, e.Message) }

// Sandbox is the API's Sandbox object.
type Sandbox struct {
	SandboxID          string  `json:"sandboxID"`
	TemplateID         string  `json:"templateID"`
	EnvdVersion        string  `json:"envdVersion"`
	EnvdAccessToken    string  `json:"envdAccessToken"`
	TrafficAccessToken *string `json:"trafficAccessToken"`
}

// ListedSandbox is the API's ListedSandbox object.
type ListedSandbox struct {
	SandboxID  string            `json:"sandboxID"`
	TemplateID string            `json:"templateID"`
	StartedAt  time.Time         `json:"startedAt"`
	EndAt      time.Time         `json:"endAt"`
	CPUCount   int               `json:"cpuCount"`
	MemoryMB   int               `json:"memoryMB"`
	State      string            `json:"state"`
	Metadata   map[string]string `json:"metadata"`
}

// Do calls the control-plane API: in is sent as JSON when not nil, and the
// response body is decoded into out when not nil. A status of 300 or more
// comes back as *Error.
func (c *Client) Do(ctx context.Context, method, path string, in, out any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.APIURL+path, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("X-API-KEY", c.APIKey)
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return resp, err
	}
	if resp.StatusCode >= 300 {
		e := &Error{Code: resp.StatusCode}
		if json.Unmarshal(data, e) != nil || e.Message == "" {
			e.Message = strings.TrimSpace(string(data))
		}
		return resp, e
	}
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			return resp, fmt.Errorf("decoding %s %s: %w", method, path, err)
		}
	}
	return resp, nil
}

// CreateOptions are the optional parts of a create.
type CreateOptions struct {
	Timeout  time.Duration
	Metadata map[string]string
	EnvVars  map[string]string
}

// Create makes a sandbox from a template.
func (c *Client) Create(ctx context.Context, template string, o CreateOptions) (Sandbox, error) {
	body := map[string]any{"templateID": template}
	if o.Timeout > 0 {
		body["timeout"] = int64(o.Timeout / time.Second)
	}
	if o.Metadata != nil {
		body["metadata"] = o.Metadata
	}
	if o.EnvVars != nil {
		body["envVars"] = o.EnvVars
	}
	var sb Sandbox
	_, err := c.Do(ctx, http.MethodPost, "/v2/sandboxes", body, &sb)
	return sb, err
}

// Connect returns a sandbox's connection details, resuming it if paused.
func (c *Client) Connect(ctx context.Context, id string, timeout time.Duration) (Sandbox, error) {
	var sb Sandbox
	_, err := c.Do(ctx, http.MethodPost, "/v2/sandboxes/"+url.PathEscape(id)+"/connect",
		map[string]any{"timeout": int64(timeout / time.Second)}, &sb)
	return sb, err
}

// List returns every sandbox, following pagination.
func (c *Client) List(ctx context.Context) ([]ListedSandbox, error) {
	var all []ListedSandbox
	next := ""
	for {
		path := "/v2/sandboxes?limit=100"
		if next != "" {
			path += "&nextToken=" + url.QueryEscape(next)
		}
		var page []ListedSandbox
		resp, err := c.Do(ctx, http.MethodGet, path, nil, &page)
		if err != nil {
			return nil, err
		}
		all = append(all, page...)
		if next = resp.Header.Get("X-Next-Token"); next == "" {
			return all, nil
		}
	}
}

// Kill destroys a sandbox.
func (c *Client) Kill(ctx context.Context, id string) error {
	_, err := c.Do(ctx, http.MethodDelete, "/sandboxes/"+url.PathEscape(id), nil, nil)
	return err
}

// headers adds what the proxy and envd need to route and authorise.
func headers(sb Sandbox) connect.Interceptor {
	return connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			setHeaders(req.Header(), sb)
			return next(ctx, req)
		}
	})
}

func setHeaders(h http.Header, sb Sandbox) {
	h.Set("E2b-Sandbox-Id", sb.SandboxID)
	h.Set("E2b-Sandbox-Port", strconv.Itoa(EnvdPort))
	h.Set("X-Access-Token", sb.EnvdAccessToken)
}

// streamHeaders is headers for streaming calls, which unary interceptors
// do not see.
type streamHeaders struct {
	connect.Interceptor
	sb Sandbox
}

func (s streamHeaders) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		setHeaders(conn.RequestHeader(), s.sb)
		return conn
	}
}

// Process returns a client of the sandbox's envd Process service.
func (c *Client) Process(sb Sandbox) processconnect.ProcessClient {
	return processconnect.NewProcessClient(c.HTTP, c.SandboxURL,
		connect.WithProtoJSON(), connect.WithInterceptors(streamHeaders{Interceptor: headers(sb), sb: sb}))
}

// Result is the outcome of Run.
type Result struct {
	ExitCode int
	Stdout   []byte
	Stderr   []byte
}

// ErrNoEnd means a command stream ended without an end event.
var ErrNoEnd = errors.New("process stream ended without an end event")

// Run runs cmd with `/bin/bash -l -c` in the sandbox, as the SDK's
// commands.run does, and waits for it to finish.
func (c *Client) Run(ctx context.Context, sb Sandbox, cmd string, stdout, stderr io.Writer) (int, error) {
	return RunWith(ctx, c.Process(sb), cmd, stdout, stderr)
}

// RunWith is Run over any envd Process client, such as one that talks to
// envd directly rather than through the proxy.
func RunWith(ctx context.Context, pc processconnect.ProcessClient, cmd string, stdout, stderr io.Writer) (int, error) {
	stdin := false
	stream, err := pc.Start(ctx, connect.NewRequest(&process.StartRequest{
		Process: &process.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-l", "-c", cmd}},
		Stdin:   &stdin,
	}))
	if err != nil {
		return -1, err
	}
	defer stream.Close()
	for stream.Receive() {
		ev := stream.Msg().GetEvent()
		if d := ev.GetData(); d != nil {
			if stdout != nil && d.GetStdout() != nil {
				stdout.Write(d.GetStdout())
			}
			if stderr != nil && d.GetStderr() != nil {
				stderr.Write(d.GetStderr())
			}
		}
		if end := ev.GetEnd(); end != nil {
			return int(end.GetExitCode()), nil
		}
	}
	if err := stream.Err(); err != nil {
		return -1, err
	}
	return -1, ErrNoEnd
}
