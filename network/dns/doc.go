// Package dns is cubicle's per-sandbox DNS resolver, the half of the E2B
// egress policy that deals in names: a sandbox's network.allowOut may name
// domains ("example.com", "*.example.com"), and packets carry only
// addresses, so the addresses a name stands for are opened at the moment the
// sandbox learns them from DNS, and for as long as the answer lives.
//
// Each sandbox's only resolver is a Resolver listening on its gateway
// address (the host end of its veth), port 53, UDP and TCP; network/policy
// lets DNS reach nothing else. For every query the resolver decides by the
// question name:
//
//   - The name matches the sandbox's Rules.Domains: the query is forwarded
//     upstream and the IPv4 addresses of the answer (the A records of the
//     question name and of the names its CNAME chain leads to, nothing else)
//     are handed to the Learner, which opens them in the kernel, before the
//     reply goes back. A sandbox is therefore never told an address it cannot
//     reach; if opening fails it is told SERVFAIL instead.
//   - Otherwise, if Rules.Open (the sandbox may reach the internet at
//     large): forwarded, nothing opened.
//   - Otherwise: REFUSED, answered locally. The query never leaves the host,
//     so a closed sandbox cannot tunnel data out through DNS.
//
// AAAA queries a sandbox may ask are answered locally with NOERROR and no
// records (NODATA), never forwarded: sandboxes have no IPv6 egress, and an
// empty answer makes clients fall back to IPv4 at once instead of trying
// addresses that cannot work. Zone transfers (AXFR, IXFR) are REFUSED.
//
// Forwarded queries go upstream byte for byte (EDNS0 options included)
// except for the message ID, which is fresh and random for every upstream
// attempt, so that only a reply to that very attempt, with the same ID and
// question, is accepted; the sandbox's own ID is put back into the reply.
// A truncated UDP reply is fetched again over TCP. TTLs in forwarded
// answers are lowered to Options.MaxTTL, so a client never caches an
// address longer than it stays open.
//
// Per sandbox the resolver keeps which name justified which address until
// when (a book), so that SetRules and Remove close exactly what is no
// longer justified: an address learned through two names stays open while
// either is still allowed and unexpired. The book is bounded (4096 names,
// 16384 name/address pairs); beyond that the least recently learned names
// are evicted and their addresses closed.
//
// Domain entries: "example.com" matches that name only; "*.example.com"
// matches every name below it at any depth but not example.com itself, and
// needs at least two labels after "*." ("*.com" is refused: it would open a
// whole top-level domain, and with it a DNS tunnel through any domain an
// attacker registers there).
//
// Floods: each sandbox has a query budget, a token bucket
// (Options.QueryRate, QueryBurst) taken from as each query arrives, before
// it is parsed, answered or forwarded, so that one sandbox cannot slow its
// neighbours' lookups down by keeping the host and the upstreams busy. A
// UDP query over the budget is dropped without a reply: a reply would cost
// the host a write for every packet of the flood, and a client that is
// really resolving retries after its timeout, by when tokens are back
// (Cilium's DNS proxy drops beyond its concurrency limit, and BIND's
// response rate limiting drops most of a flood, for the same reasons). A TCP
// query over the budget is answered REFUSED instead: left unanswered, it
// would stall the connection's later queries until the client gives up,
// and TCP cannot be spoofed into reflecting anything. Resolver.Stats counts
// both. Independently, Options.MaxInflight bounds the queries one sandbox
// has in flight, and with them the upstream sockets and goroutines it can
// hold.
//
// Concurrency: each sandbox has one UDP socket and one TCP listener, each
// served by its own goroutine, and a goroutine per query in flight (at most
// Options.MaxInflight; beyond that SERVFAIL at once). Lock order:
// Resolver.mu, then sandbox.mu (handler.mu). Learner calls are made with
// the sandbox's mutex held, so that an answer racing SetRules or Remove can
// never open an address the new rules no longer justify.
package dns
