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
	mapPrivate  = "private"
	progName    = "egress"
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

// addrKey keys the global hard and private LPM tries.
type addrKey struct {
	Prefixlen uint32
	Addr      [4]byte
}

func mapSpecs(maxSandboxes, maxRules uint32) map[string]*ebpf.MapSpec {
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
		mapAllow:   lpm(mapAllow, 12, maxRules),
		mapDeny:    lpm(mapDeny, 12, maxRules),
		mapHard:    lpm(mapHard, 8, 4096),
		mapPrivate: lpm(mapPrivate, 8, 64),
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

	// TC verdicts, include/uapi/linux/pkt_cls.h.
	tcActOK   = 0
	tcActShot = 2
)

// Stack layout (offsets from R10).
const (
	stIfindex = -4  // u32 map key
	stIP      = -32 // 20-byte IPv4 header
	stL4      = -48 // first 14 bytes of the L4 header
	stState   = -52 // socket state across sk_release
	stTuple   = -64 // bpf_sock_tuple.ipv4
	stRuleKey = -80 // ruleKey
	stAddrKey = -88 // addrKey
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

		// 4. The sandbox's own gateway (the host): replies only.
		asm.LoadMem(asm.R1, asm.RFP, stIP+16, asm.Word),
		asm.LoadMem(asm.R2, cfg, cfgGateway, asm.Word),
		asm.JEq.Reg(asm.R1, asm.R2, "gateway"),

		// 5. Hard denies.
		asm.StoreImm(asm.RFP, stAddrKey, 32, asm.Word),
		asm.StoreMem(asm.RFP, stAddrKey+4, asm.R1, asm.Word),
	)
	addAll(lookup(mapHard, stAddrKey))
	add(
		asm.JNE.Imm(asm.R0, 0, "drop"),

		// 6. allowOut wins.
		asm.StoreImm(asm.RFP, stRuleKey, 64, asm.Word),
		asm.LoadMem(asm.R1, cfg, cfgPolicyID, asm.Word),
		asm.StoreMem(asm.RFP, stRuleKey+4, asm.R1, asm.Word),
		asm.LoadMem(asm.R1, asm.RFP, stIP+16, asm.Word),
		asm.StoreMem(asm.RFP, stRuleKey+8, asm.R1, asm.Word),
	)
	addAll(lookup(mapAllow, stRuleKey))
	add(asm.JNE.Imm(asm.R0, 0, "pass"))
	// 7. denyOut.
	addAll(lookup(mapDeny, stRuleKey))
	add(
		asm.JNE.Imm(asm.R0, 0, "drop"),
		// 8. allow_internet_access=false: deny the rest.
		asm.LoadMem(asm.R1, cfg, cfgFlags, asm.Word),
		asm.And.Imm(asm.R1, flagInternet),
		asm.JEq.Imm(asm.R1, 0, "drop"),
	)
	// 9. Private ranges closed by default.
	addAll(lookup(mapPrivate, stAddrKey))
	add(
		asm.JNE.Imm(asm.R0, 0, "drop"),
		// 10. The rest passes.
		asm.Ja.Label("pass"),
	)

	// Gateway: an ICMP echo reply, or a TCP segment other than a bare SYN
	// that belongs to a non-listening TCP socket of the host (one the host
	// opened or accepted), passes. Nothing else reaches the host.
	add(
		// Non-first fragments carry no L4 header to check.
		asm.LoadMem(asm.R1, asm.RFP, stIP+6, asm.Half).WithSymbol("gateway"),
		asm.And.Imm(asm.R1, be16(0x1fff)),
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
