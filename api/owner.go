package api

import (
	"context"
	"net/http"

	"github.com/cubicle-dev/cubicle/orchestrator"
	"github.com/cubicle-dev/cubicle/store"
)

// The tenant wall. A sandbox belongs to the owner that created it, and every
// /sandboxes route answers only that owner: to anyone else a sandbox that
// exists is indistinguishable from one that does not (404 "sandbox not
// found"), lists show only the caller's own, and the sandbox's secrets (the
// envd and traffic access tokens) never leave through another owner's
// request. The proxy needs no check of its own: envd and the proxy demand
// those tokens, which only the owner can obtain.
//
// The wall is enforced in exactly two places, so that no handler can forget
// it: sandboxRoute, the only way to register a route that names a sandbox
// (its handler receives the sandbox only after the owner check), and
// ownedSandboxes, the only source of lists.

type ownerCtx struct{}

// ownerOf is who owns what a key creates, and who may see it. It is the
// key itself today; with teams it becomes the key's team.
func ownerOf(k store.APIKey) string { return k.ID }

// requestOwner is the owner the authenticated request acts for; "" (owner
// of nothing) when the request was not authenticated.
func requestOwner(ctx context.Context) string {
	o, _ := ctx.Value(ownerCtx{}).(string)
	return o
}

// sandboxHandler serves a route that names a sandbox the caller owns.
type sandboxHandler func(w http.ResponseWriter, r *http.Request, sb orchestrator.Info)

// owned resolves a route's {id} to a sandbox the caller owns, answering
// exactly as for a sandbox that does not exist when it is someone else's.
func (s *Server) owned(h sandboxHandler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sb, err := s.opts.Orchestrator.Get(r.PathValue("id"))
		if err != nil {
			s.fail(w, err)
			return
		}
		in := sb.Info()
		if owner := requestOwner(r.Context()); owner == "" || in.Owner != owner {
			s.fail(w, orchestrator.ErrNotFound)
			return
		}
		h(w, r, in)
	})
}

// ownedSandboxes returns the caller's sandboxes.
func (s *Server) ownedSandboxes(r *http.Request) []orchestrator.Info {
	owner := requestOwner(r.Context())
	all := s.opts.Orchestrator.All()
	out := make([]orchestrator.Info, 0, len(all))
	if owner == "" {
		return out
	}
	for _, sb := range all {
		if in := sb.Info(); in.Owner == owner {
			out = append(out, in)
		}
	}
	return out
}
