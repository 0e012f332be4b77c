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
//     host): only replies pass. An ICMP echo reply passes; a TCP segment
//     that is not a bare SYN passes only if the host holds a matching
//     non-listening TCP socket (bpf_sk_lookup_tcp in the host namespace),
//     i.e. the host opened the connection, as it does to envd on
//     49983 or to any proxied port. Everything else to the host is dropped
//     — UDP too, until DNS on the gateway is added here as an explicit
//     exception (UDP/TCP 53 to the own gateway only).
//  5. Hard denies, which no policy opens: the whole sandbox pool (other
//     sandboxes and their gateways), the host's addresses (SetHostAddrs),
//     0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16 (cloud metadata), 224.0.0.0/4
//     and 240.0.0.0/4 (incl. 255.255.255.255).
//  6. allowOut match: pass. (allowOut wins over everything below, as in
//     E2B.)
//  7. denyOut match: drop.
//  8. allow_internet_access=false: drop (E2B: it means denyOut 0.0.0.0/0,
//     so allowOut still opens what it names).
//  9. Private ranges (10/8, 172.16/12, 192.168/16, 100.64/10): drop; only
//     an allowOut entry opens them.
//  10. Pass.
//
// Traffic to the sandbox is not filtered: replies to what step 4–10 let
// out, and the host's own connections to the sandbox, must reach it.
//
// Maps. allowOut and denyOut live in two LPM tries shared by all
// sandboxes, keyed by (policy ID, IPv4 prefix), rather than in per-sandbox
// inner maps: no map-in-map creation per sandbox, one fixed memory bound,
// and an atomic live update for free — Update writes the new rules under a
// fresh policy ID, switches the sandbox's config entry (keyed by host-end
// ifindex) to it in one map write, then deletes the old rules, so every
// packet sees either the whole old or the whole new policy. Counters are a
// per-CPU hash keyed by ifindex. All maps and the program are pinned under
// PinRoot/Name, and the cls_bpf filters live on the links, so enforcement
// continues while cubicle restarts; New adopts what it finds.
package policy
