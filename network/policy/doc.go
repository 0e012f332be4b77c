// Package policy enforces each sandbox's egress policy in the kernel: one
// eBPF TC classifier, attached at the clsact ingress hook of every
// sandbox's host-end veth (so it sees every packet the sandbox sends), and
// per-sandbox policy in eBPF maps. No iptables.
//
// Rule order, first match wins, for a packet from the sandbox:
//
//  1. ARP passes.
//  2. IPv6 is dropped (counted apart); other non-IPv4 is dropped.
//  3. A source other than the sandbox's own address is dropped (spoofing).
//  4. To the sandbox's own gateway (the host end of its veth, i.e. the
//     host): only DNS and replies pass. UDP or TCP to port 53 passes, with
//     any TCP flags (cubicle's resolver listens there; network/dns). An
//     ICMP echo reply passes; a TCP segment that is not a bare SYN passes
//     only if the host holds a matching non-listening TCP socket
//     (bpf_sk_lookup_tcp in the host namespace), i.e. the host opened the
//     connection, as it does to envd on 49983 or to any proxied port.
//     Everything else to the host is dropped, other UDP included.
//  5. Hard denies, which no policy opens: the whole sandbox pool (other
//     sandboxes and their gateways), the host's addresses (SetHostAddrs,
//     FollowHostAddrs), the operator's Options.DenyCIDRs, 0.0.0.0/8,
//     127.0.0.0/8, 169.254.0.0/16 (cloud metadata), 224.0.0.0/4 and
//     240.0.0.0/4 (incl. 255.255.255.255).
//  6. UDP or TCP to port 53 or 853 (DNS, DNS over TLS) on any other
//     address: drop, whatever allowOut says, so that the sandbox's only
//     resolver is cubicle's and DNS cannot tunnel data out. Non-first IP
//     fragments carry no ports; they go on to the address rules.
//  7. allowOut match: pass. (allowOut wins over everything below, as in
//     E2B.)
//  8. A flow in the flows map passes (TCP or UDP, by destination address
//     and port, source port and protocol); so does a destination the
//     sandbox's resolver learned (Learn) whose deadline has not passed and
//     that is not closed (rule 11: a name resolving to 10.x or to the
//     host's LAN must not open it; only allowOut does). A TCP or UDP packet passed for a
//     learned address records its flow, so that connections opened while
//     an answer was valid keep working after it expires or is forgotten:
//     as with conntrack, expiry, Forget and policy changes do not cut a
//     connection that has its flow, they close the address to new ones.
//  9. denyOut match: drop.
//  10. allow_internet_access=false: drop (E2B: it means denyOut 0.0.0.0/0,
//     so allowOut and learned domain answers still open what they name).
//  11. Closed ranges: drop; only an allowOut entry opens them. They are
//     the private ranges (10/8, 172.16/12, 192.168/16, 100.64/10), the
//     special-purpose ranges that are not globally reachable (192.0.0/24,
//     192.0.2/24, 192.88.99/24, 198.18/15, 198.51.100/24, 203.0.113/24;
//     see closedRanges), and the host's LAN: its connected subnets,
//     on-link routes and every route's gateway (HostLAN, followed by
//     FollowHostAddrs), so that a host whose LAN uses public addresses
//     does not open its router and neighbours. The operator's
//     Options.AllowCIDRs take ranges out of this rule (they are then
//     treated as the internet is); they cannot take anything out of rule
//     5.
//  12. Pass.
//
// Traffic to the sandbox is not filtered: replies to what steps 4–12 let
// out, and the host's own connections to the sandbox, must reach it.
//
// Maps. allowOut and denyOut live in two LPM tries shared by all
// sandboxes, keyed by (policy ID, IPv4 prefix), rather than in per-sandbox
// inner maps: no map-in-map creation per sandbox, one fixed memory bound,
// and an atomic live update for free — Update writes the new rules under a
// fresh policy ID, switches the sandbox's config entry (keyed by host-end
// ifindex) to it in one map write, then deletes the old rules, so every
// packet sees either the whole old or the whole new policy. Counters are a
// per-CPU hash keyed by ifindex.
//
// The closed ranges are one LPM trie whose value says closed (1) or
// opened by the operator (0): an Options.AllowCIDRs entry is stored open
// and closed prefixes inside it are left out, so the longest match of an
// address in it is open, and of any other address in a closed range is
// closed.
//
// Learned addresses are a hash keyed by (ifindex, address) whose value is
// the deadline in CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns); only the
// Manager writes it (Learn, Forget), and SweepLearned deletes what has
// expired. Flows are an LRU hash keyed by (ifindex, destination, ports,
// protocol) whose value is the last time a packet used the flow; the
// program creates them, Detach deletes a sandbox's, and SweepLearned
// deletes those idle for Options.FlowIdleTimeout. It is preallocated
// (Options.MaxFlows entries at 88 bytes: 5.5 MiB by default), and when it
// is full the kernel evicts the least recently used flow of any sandbox: a
// connection whose flow was evicted keeps working only while its address
// is still learned. Rule 8 is skipped for a sandbox that has never had an
// address learned (a flag bit in its config entry), so sandboxes without
// domain rules pay nothing for it.
//
// All maps and the program are pinned under PinRoot/Name, and the cls_bpf
// filters live on the links, so enforcement continues while cubicle
// restarts; New adopts what it finds, learned addresses and flows
// included.
package policy
