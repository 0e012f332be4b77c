package policy

import (
	"encoding/binary"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"
)

// Map names, also the file names of their pins.
const (
	mapConfig   = "config"
	mapCounters = "counters"
	mapAllow    = "allow"
	mapDeny     = "deny"
	mapHard     = "hard"
	mapClosed   = "closed"
	mapLearned  = "learned"
	mapFlows    = "flows"
	progName    = "egress"

	// legacyMapPrivate is the closed map's former name; New removes
	// its pin.
	legacyMapPrivate = "private"
)

// configValue is the config map's value, keyed by the host-end ifindex. Its
// layout is read by the program at the cfg* offsets below.
type configValue struct {
	PolicyID uint32  // key prefix of this sandbox's allow/deny entries
	Flags    uint32  // flag* bits
	Gateway  [4]byte // host-end address, network order
	Addr     [4]byte // sandbox-end address, network order
}

const (
	cfgPolicyID = 0
	cfgFlags    = 4
	cfgGateway  = 8
	cfgAddr     = 12

	flagInternet = 1
	// flagLearned is set by the first Learn for a sandbox and stays until
	// Detach: only then does the program look at the learned and flows
	// maps, so sandboxes without domain rules pay nothing for them. It
	// uses a spare bit of Flags, so the pinned config layout is unchanged.
	flagLearned = 2
)

// counterValue is one CPU's counters of one sandbox (per-CPU hash).
type counterValue struct {
	PassPackets, PassBytes uint64
	DropPackets, DropBytes uint64
	DropIPv6Packets        uint64
}

const (
	ctrPassPkts = 0
	ctrPassB    = 8
	ctrDropPkts = 16
	ctrDropB    = 24
	ctrDropV6   = 32
)

// ruleKey keys the allow and deny LPM tries: the policy ID, then the IPv4
// prefix. Prefixlen counts the ID's 32 bits too, so a rule matches only
// under its own policy ID. The ID is in native byte order in both the
// program and Go; what matters to the trie is only that they agree.
type ruleKey struct {
	Prefixlen uint32
	PolicyID  uint32
	Addr      [4]byte
}

// addrKey keys the global hard and closed LPM tries. The hard trie's
// value is 1; the closed trie's is closedClosed or closedOpen.
type addrKey struct {
	Prefixlen uint32
	Addr      [4]byte
}

// learnKey keys the learned hash: one destination opened for one sandbox
// by a DNS answer. Its value is the deadline, a uint64 of CLOCK_MONOTONIC
// nanoseconds, the clock of bpf_ktime_get_ns.
type learnKey struct {
	Ifindex uint32
	Addr    [4]byte
}

// flowKey keys the flows LRU hash: one TCP or UDP flow that a learned
// address let out, by its outgoing direction (the source address is the
// sandbox's, fixed by anti-spoofing, so the ifindex stands for it). Its
// value is the flow's last-seen time (bpf_ktime_get_ns). The kernel
// compares hash keys bytewise, so the program zeroes Pad.
type flowKey struct {
	Ifindex      uint32
	Addr         [4]byte
	Sport, Dport [2]byte // network order, as in the packet
	Proto        uint8
	Pad          [3]byte
}

const (
	fkIfindex = 0
	fkAddr    = 4
	fkSport   = 8
	fkDport   = 10
	fkProto   = 12
	fkLen     = 16
)

func mapSpecs(maxSandboxes, maxRules, maxLearned, maxFlows uint32) map[string]*ebpf.MapSpec {
	lpm := func(name string, keySize, max uint32) *ebpf.MapSpec {
		return &ebpf.MapSpec{Name: name, Type: ebpf.LPMTrie, KeySize: keySize, ValueSize: 4,
			MaxEntries: max, Flags: unix.BPF_F_NO_PREALLOC, Pinning: ebpf.PinByName}
	}
	return map[string]*ebpf.MapSpec{
		mapConfig: {Name: mapConfig, Type: ebpf.Hash, KeySize: 4, ValueSize: 16,
			MaxEntries: maxSandboxes, Pinning: ebpf.PinByName},
		// Not preallocated: a preallocated per-CPU hash costs
		// entries × CPUs × 40 bytes up front.
		mapCounters: {Name: mapCounters, Type: ebpf.PerCPUHash, KeySize: 4, ValueSize: 40,
			MaxEntries: maxSandboxes, Flags: unix.BPF_F_NO_PREALLOC, Pinning: ebpf.PinByName},
		mapAllow:  lpm(mapAllow, 12, maxRules),
		mapDeny:   lpm(mapDeny, 12, maxRules),
		mapHard:   lpm(mapHard, 8, 4096),
		mapClosed: lpm(mapClosed, 8, maxClosed),
		// Written only by the Manager (Learn, Forget, SweepLearned), so
		// not preallocated: memory follows what is learned.
		mapLearned: {Name: mapLearned, Type: ebpf.Hash, KeySize: 8, ValueSize: 8,
			MaxEntries: maxLearned, Flags: unix.BPF_F_NO_PREALLOC, Pinning: ebpf.PinByName},
		// Written by the program; an LRU hash is always preallocated and
		// evicts the least recently used flow when full (Options.MaxFlows).
		mapFlows: {Name: mapFlows, Type: ebpf.LRUHash, KeySize: fkLen, ValueSize: 8,
			MaxEntries: maxFlows, Pinning: ebpf.PinByName},
	}
}

// Packet and context constants.
const (
	// __sk_buff field offsets, include/uapi/linux/bpf.h.
	skbLen      = 0
	skbProtocol = 16
	skbIfindex  = 40

	// ethHdrLen is sizeof(struct ethhdr), include/uapi/linux/if_ether.h.
	ethHdrLen = 14
	// EtherTypes, include/uapi/linux/if_ether.h.
	ethPIP   = 0x0800
	ethPARP  = 0x0806
	ethPIPv6 = 0x86DD

	// IP protocol numbers, include/uapi/linux/in.h.
	ipprotoICMP = 1
	ipprotoTCP  = 6
	ipprotoUDP  = 17
	// portDNS and portDoT are DNS (RFC 1035 §4.2) and DNS over TLS
	// (RFC 7858 §3.1).
	portDNS = 53
	portDoT = 853
	// ipFragOffset masks the fragment offset in the IPv4 header's flags
	// and fragment-offset half-word, RFC 791 §3.1.
	ipFragOffset = 0x1fff
	// icmpEchoReply is ICMP_ECHOREPLY, include/uapi/linux/icmp.h.
	icmpEchoReply = 0
	// TCP flag bits in byte 13 of the header, RFC 9293 §3.1.
	tcpSYN = 0x02
	tcpACK = 0x10
	// tcpListen is TCP_LISTEN, include/net/tcp_states.h.
	tcpListen = 10

	// bpfSockState is offsetof(struct bpf_sock, state), include/uapi/linux/bpf.h.
	bpfSockState = 72
	// sockTupleV4Len is sizeof(bpf_sock_tuple.ipv4): saddr, daddr, sport, dport.
	sockTupleV4Len = 12
	// bpfFCurrentNetns is BPF_F_CURRENT_NETNS (-1): look the socket up in
	// the namespace of the device the packet is on, i.e. the host.
	bpfFCurrentNetns = -1

	// bpfAny is BPF_ANY: create or replace a map entry.
	bpfAny = 0

	// TC verdicts, include/uapi/linux/pkt_cls.h.
	tcActOK   = 0
	tcActShot = 2
)

// Stack layout (offsets from R10; each slot is aligned to its size and
// none overlaps: the comment gives the bytes it spans).
const (
	stIfindex  = -4   // u32 map key, [-4, 0)
	stIP       = -32  // 20-byte IPv4 header, [-32, -12)
	stL4       = -48  // first 14 bytes of the L4 header (gateway), [-48, -34)
	stState    = -52  // socket state across sk_release, [-52, -48)
	stTuple    = -64  // bpf_sock_tuple.ipv4, [-64, -52)
	stRuleKey  = -80  // ruleKey, [-80, -68)
	stAddrKey  = -88  // addrKey, [-88, -80)
	stFlowKey  = -104 // flowKey, [-104, -88); Proto 0 means "no ports"
	stNow      = -112 // u64 bpf_ktime_get_ns, [-112, -104)
	stLearnKey = -120 // learnKey, [-120, -112)
)

// be16 is a 16-bit network-order constant as the program sees it after
// loading it from the packet or skb->protocol into a register.
func be16(v uint16) int32 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return int32(binary.NativeEndian.Uint16(b[:]))
}

// program is the TC classifier attached at clsact ingress of each sandbox's
// host-end veth, so it sees every packet the sandbox sends. The rule order
// is in the package documentation; each step is marked below.
func program(m map[string]*ebpf.Map) asm.Instructions {
	const (
		ctx  = asm.R6 // *__sk_buff
		cfg  = asm.R7 // *configValue
		ctr  = asm.R8 // *counterValue of this CPU, or NULL
		plen = asm.R9 // skb->len
	)
	lookup := func(name string, keyOff int16) asm.Instructions {
		return asm.Instructions{
			asm.LoadMapPtr(asm.R1, m[name].FD()),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, int32(keyOff)),
			asm.FnMapLookupElem.Call(),
		}
	}
	var in asm.Instructions
	add := func(is ...asm.Instruction) { in = append(in, is...) }
	addAll := func(is asm.Instructions) { in = append(in, is...) }
	// addAt appends is with label on its first instruction.
	addAt := func(label string, is asm.Instructions) {
		is[0] = is[0].WithSymbol(label)
		in = append(in, is...)
	}

	add(
		asm.Mov.Reg(ctx, asm.R1),
		asm.LoadMem(plen, ctx, skbLen, asm.Word),
		asm.LoadMem(asm.R1, ctx, skbIfindex, asm.Word),
		asm.StoreMem(asm.RFP, stIfindex, asm.R1, asm.Word),
	)
	// An interface without a config entry is one being torn down or
	// never attached through the Manager: fail closed.
	addAll(lookup(mapConfig, stIfindex))
	add(asm.JEq.Imm(asm.R0, 0, "shot"), asm.Mov.Reg(cfg, asm.R0))
	addAll(lookup(mapCounters, stIfindex))
	add(
		asm.Mov.Reg(ctr, asm.R0),
		// 1. ARP passes; 2. IPv6 drops (counted); other non-IPv4 drops.
		asm.LoadMem(asm.R1, ctx, skbProtocol, asm.Word),
		asm.JEq.Imm(asm.R1, be16(ethPARP), "pass"),
		asm.JEq.Imm(asm.R1, be16(ethPIPv6), "drop6"),
		asm.JNE.Imm(asm.R1, be16(ethPIP), "drop"),

		asm.Mov.Reg(asm.R1, ctx),
		asm.Mov.Imm(asm.R2, ethHdrLen),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, stIP),
		asm.Mov.Imm(asm.R4, 20),
		asm.FnSkbLoadBytes.Call(),
		asm.JNE.Imm(asm.R0, 0, "drop"),
		asm.LoadMem(asm.R1, asm.RFP, stIP, asm.Byte),
		asm.And.Imm(asm.R1, 0x0f),
		asm.JLT.Imm(asm.R1, 5, "drop"),

		// 3. Anti-spoofing: the source must be the sandbox's own address.
		asm.LoadMem(asm.R1, asm.RFP, stIP+12, asm.Word),
		asm.LoadMem(asm.R2, cfg, cfgAddr, asm.Word),
		asm.JNE.Reg(asm.R1, asm.R2, "drop"),

		// The flow key, also where the DNS rules find the ports: ifindex
		// and destination, the rest zeroed (hash keys compare padding too),
		// then
		// protocol and ports only for a TCP or UDP packet that carries its
		// header, i.e. is not a non-first fragment. Proto stays 0 for
		// every other packet: "no ports".
		asm.Mov.Imm(asm.R1, 0),
		asm.StoreMem(asm.RFP, stFlowKey+8, asm.R1, asm.DWord),
		asm.LoadMem(asm.R1, asm.RFP, stIfindex, asm.Word),
		asm.StoreMem(asm.RFP, stFlowKey+fkIfindex, asm.R1, asm.Word),
		asm.LoadMem(asm.R1, asm.RFP, stIP+16, asm.Word),
		asm.StoreMem(asm.RFP, stFlowKey+fkAddr, asm.R1, asm.Word),
		asm.LoadMem(asm.R1, asm.RFP, stIP+6, asm.Half),
		asm.And.Imm(asm.R1, be16(ipFragOffset)),
		asm.JNE.Imm(asm.R1, 0, "l4done"),
		asm.LoadMem(asm.R1, asm.RFP, stIP+9, asm.Byte),
		asm.JEq.Imm(asm.R1, ipprotoTCP, "ports"),
		asm.JNE.Imm(asm.R1, ipprotoUDP, "l4done"),
		asm.StoreMem(asm.RFP, stFlowKey+fkProto, asm.R1, asm.Byte).WithSymbol("ports"),
		// Source and destination port are the first 4 bytes of both
		// headers; a TCP or UDP packet too short to hold them is malformed.
		asm.LoadMem(asm.R2, asm.RFP, stIP, asm.Byte),
		asm.And.Imm(asm.R2, 0x0f),
		asm.LSh.Imm(asm.R2, 2),
		asm.Add.Imm(asm.R2, ethHdrLen),
		asm.Mov.Reg(asm.R1, ctx),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, stFlowKey+fkSport),
		asm.Mov.Imm(asm.R4, 4),
		asm.FnSkbLoadBytes.Call(),
		asm.JNE.Imm(asm.R0, 0, "drop"),

		// 4. The sandbox's own gateway (the host): DNS and replies only.
		asm.LoadMem(asm.R1, asm.RFP, stIP+16, asm.Word).WithSymbol("l4done"),
		asm.LoadMem(asm.R2, cfg, cfgGateway, asm.Word),
		asm.JEq.Reg(asm.R1, asm.R2, "gateway"),

		// 5. Hard denies.
		asm.StoreImm(asm.RFP, stAddrKey, 32, asm.Word),
		asm.StoreMem(asm.RFP, stAddrKey+4, asm.R1, asm.Word),
	)
	addAll(lookup(mapHard, stAddrKey))
	add(
		asm.JNE.Imm(asm.R0, 0, "drop"),
		// 6. DNS and DNS over TLS anywhere but the own gateway.
		asm.LoadMem(asm.R1, asm.RFP, stFlowKey+fkProto, asm.Byte),
		asm.JEq.Imm(asm.R1, 0, "allow"),
		asm.LoadMem(asm.R1, asm.RFP, stFlowKey+fkDport, asm.Half),
		asm.JEq.Imm(asm.R1, be16(portDNS), "drop"),
		asm.JEq.Imm(asm.R1, be16(portDoT), "drop"),

		// 7. allowOut wins.
		asm.StoreImm(asm.RFP, stRuleKey, 64, asm.Word).WithSymbol("allow"),
		asm.LoadMem(asm.R1, cfg, cfgPolicyID, asm.Word),
		asm.StoreMem(asm.RFP, stRuleKey+4, asm.R1, asm.Word),
		asm.LoadMem(asm.R1, asm.RFP, stIP+16, asm.Word),
		asm.StoreMem(asm.RFP, stRuleKey+8, asm.R1, asm.Word),
	)
	addAll(lookup(mapAllow, stRuleKey))
	add(
		asm.JNE.Imm(asm.R0, 0, "pass"),

		// 8. Flows and learned addresses, for sandboxes that have had
		// anything learned. A known flow passes first: it is the common
		// case and needs one lookup.
		asm.LoadMem(asm.R1, cfg, cfgFlags, asm.Word),
		asm.And.Imm(asm.R1, flagLearned),
		asm.JEq.Imm(asm.R1, 0, "deny"),
		asm.FnKtimeGetNs.Call(),
		asm.StoreMem(asm.RFP, stNow, asm.R0, asm.DWord),
		asm.LoadMem(asm.R1, asm.RFP, stFlowKey+fkProto, asm.Byte),
		asm.JEq.Imm(asm.R1, 0, "learned"),
	)
	addAll(lookup(mapFlows, stFlowKey))
	add(
		asm.JEq.Imm(asm.R0, 0, "learned"),
		asm.LoadMem(asm.R1, asm.RFP, stNow, asm.DWord),
		asm.StoreMem(asm.R0, 0, asm.R1, asm.DWord),
		asm.Ja.Label("pass"),

		asm.LoadMem(asm.R1, asm.RFP, stIfindex, asm.Word).WithSymbol("learned"),
		asm.StoreMem(asm.RFP, stLearnKey, asm.R1, asm.Word),
		asm.LoadMem(asm.R1, asm.RFP, stIP+16, asm.Word),
		asm.StoreMem(asm.RFP, stLearnKey+4, asm.R1, asm.Word),
	)
	addAll(lookup(mapLearned, stLearnKey))
	add(
		asm.JEq.Imm(asm.R0, 0, "deny"),
		// Learned until the deadline, exclusive.
		asm.LoadMem(asm.R1, asm.R0, 0, asm.DWord),
		asm.LoadMem(asm.R2, asm.RFP, stNow, asm.DWord),
		asm.JGE.Reg(asm.R2, asm.R1, "deny"),
	)
	// A name may resolve to a private address or one of the host's
	// networks; that must not open them: only allowOut does.
	addAll(lookup(mapClosed, stAddrKey))
	add(
		asm.JEq.Imm(asm.R0, 0, "learned_open"),
		asm.LoadMem(asm.R1, asm.R0, 0, asm.Word),
		asm.JNE.Imm(asm.R1, closedOpen, "deny"),
		asm.LoadMem(asm.R1, asm.RFP, stFlowKey+fkProto, asm.Byte).WithSymbol("learned_open"),
		asm.JEq.Imm(asm.R1, 0, "pass"),
		// Record the flow. Should the update fail, the packet still
		// passes: the address is learned, and the next packet tries again.
		asm.LoadMapPtr(asm.R1, m[mapFlows].FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, stFlowKey),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, stNow),
		asm.Mov.Imm(asm.R4, bpfAny),
		asm.FnMapUpdateElem.Call(),
		asm.Ja.Label("pass"),
	)
	// 9. denyOut.
	addAt("deny", lookup(mapDeny, stRuleKey))
	add(
		asm.JNE.Imm(asm.R0, 0, "drop"),
		// 10. allow_internet_access=false: deny the rest.
		asm.LoadMem(asm.R1, cfg, cfgFlags, asm.Word),
		asm.And.Imm(asm.R1, flagInternet),
		asm.JEq.Imm(asm.R1, 0, "drop"),
	)
	// 11. Private and special-purpose ranges, the host's networks and
	// gateways: closed by default, unless the operator opened them.
	addAll(lookup(mapClosed, stAddrKey))
	add(
		asm.JEq.Imm(asm.R0, 0, "pass"),
		asm.LoadMem(asm.R1, asm.R0, 0, asm.Word),
		asm.JNE.Imm(asm.R1, closedOpen, "drop"),
		// 12. The rest passes.
		asm.Ja.Label("pass"),
	)

	// Gateway: DNS (UDP or TCP to port 53, any TCP flags: the sandbox
	// opens TCP DNS connections to it), an ICMP echo reply, or a TCP
	// segment other than a bare SYN that belongs to a non-listening TCP
	// socket of the host (one the host opened or accepted), passes.
	// Nothing else reaches the host.
	add(
		asm.LoadMem(asm.R1, asm.RFP, stFlowKey+fkProto, asm.Byte).WithSymbol("gateway"),
		asm.JEq.Imm(asm.R1, 0, "gw_other"),
		asm.LoadMem(asm.R1, asm.RFP, stFlowKey+fkDport, asm.Half),
		asm.JEq.Imm(asm.R1, be16(portDNS), "pass"),
		// Non-first fragments carry no L4 header to check.
		asm.LoadMem(asm.R1, asm.RFP, stIP+6, asm.Half).WithSymbol("gw_other"),
		asm.And.Imm(asm.R1, be16(ipFragOffset)),
		asm.JNE.Imm(asm.R1, 0, "drop"),
		asm.LoadMem(asm.R2, asm.RFP, stIP, asm.Byte),
		asm.And.Imm(asm.R2, 0x0f),
		asm.LSh.Imm(asm.R2, 2),
		asm.Add.Imm(asm.R2, ethHdrLen),
		asm.Mov.Reg(asm.R1, ctx),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, stL4),
		asm.Mov.Imm(asm.R4, 14),
		asm.LoadMem(asm.R5, asm.RFP, stIP+9, asm.Byte),
		asm.JEq.Imm(asm.R5, ipprotoICMP, "gw_icmp"),
		asm.JNE.Imm(asm.R5, ipprotoTCP, "drop"),
		asm.FnSkbLoadBytes.Call(),
		asm.JNE.Imm(asm.R0, 0, "drop"),
		asm.LoadMem(asm.R1, asm.RFP, stL4+13, asm.Byte),
		asm.And.Imm(asm.R1, tcpSYN|tcpACK),
		asm.JEq.Imm(asm.R1, tcpSYN, "drop"),
		// bpf_sock_tuple.ipv4 is saddr, daddr, sport, dport: the IPv4
		// header's last 8 bytes then the TCP header's first 4.
		asm.LoadMem(asm.R1, asm.RFP, stIP+12, asm.Word),
		asm.StoreMem(asm.RFP, stTuple, asm.R1, asm.Word),
		asm.LoadMem(asm.R1, asm.RFP, stIP+16, asm.Word),
		asm.StoreMem(asm.RFP, stTuple+4, asm.R1, asm.Word),
		asm.LoadMem(asm.R1, asm.RFP, stL4, asm.Word),
		asm.StoreMem(asm.RFP, stTuple+8, asm.R1, asm.Word),
		asm.Mov.Reg(asm.R1, ctx),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, stTuple),
		asm.Mov.Imm(asm.R3, sockTupleV4Len),
		asm.Mov.Imm(asm.R4, bpfFCurrentNetns),
		asm.Mov.Imm(asm.R5, 0),
		asm.FnSkLookupTcp.Call(),
		asm.JEq.Imm(asm.R0, 0, "drop"),
		asm.LoadMem(asm.R1, asm.R0, bpfSockState, asm.Word),
		asm.StoreMem(asm.RFP, stState, asm.R1, asm.Word),
		asm.Mov.Reg(asm.R1, asm.R0),
		asm.FnSkRelease.Call(),
		asm.LoadMem(asm.R1, asm.RFP, stState, asm.Word),
		asm.JEq.Imm(asm.R1, tcpListen, "drop"),
		asm.Ja.Label("pass"),

		// An echo reply may be as short as its 8-byte header (RFC 792).
		asm.Mov.Imm(asm.R4, 8).WithSymbol("gw_icmp"),
		asm.FnSkbLoadBytes.Call(),
		asm.JNE.Imm(asm.R0, 0, "drop"),
		asm.LoadMem(asm.R1, asm.RFP, stL4, asm.Byte),
		asm.JEq.Imm(asm.R1, icmpEchoReply, "pass"),
		asm.Ja.Label("drop"),
	)

	// Verdicts, counted when the sandbox has a counter entry.
	add(
		asm.JEq.Imm(ctr, 0, "drop").WithSymbol("drop6"),
		asm.LoadMem(asm.R1, ctr, ctrDropV6, asm.DWord),
		asm.Add.Imm(asm.R1, 1),
		asm.StoreMem(ctr, ctrDropV6, asm.R1, asm.DWord),

		asm.JEq.Imm(ctr, 0, "shot").WithSymbol("drop"),
		asm.LoadMem(asm.R1, ctr, ctrDropPkts, asm.DWord),
		asm.Add.Imm(asm.R1, 1),
		asm.StoreMem(ctr, ctrDropPkts, asm.R1, asm.DWord),
		asm.LoadMem(asm.R1, ctr, ctrDropB, asm.DWord),
		asm.Add.Reg(asm.R1, plen),
		asm.StoreMem(ctr, ctrDropB, asm.R1, asm.DWord),
		asm.Mov.Imm(asm.R0, tcActShot).WithSymbol("shot"),
		asm.Return(),

		asm.JEq.Imm(ctr, 0, "ok").WithSymbol("pass"),
		asm.LoadMem(asm.R1, ctr, ctrPassPkts, asm.DWord),
		asm.Add.Imm(asm.R1, 1),
		asm.StoreMem(ctr, ctrPassPkts, asm.R1, asm.DWord),
		asm.LoadMem(asm.R1, ctr, ctrPassB, asm.DWord),
		asm.Add.Reg(asm.R1, plen),
		asm.StoreMem(ctr, ctrPassB, asm.R1, asm.DWord),
		asm.Mov.Imm(asm.R0, tcActOK).WithSymbol("ok"),
		asm.Return(),
	)
	return in
}
