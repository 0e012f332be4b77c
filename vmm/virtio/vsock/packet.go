package vsock

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cubicle-dev/cubicle/vmm/virtio/queue"
)

// Packet header and protocol constants (virtio 1.2 §5.10.6, and Linux
// include/uapi/linux/virtio_vsock.h).
const (
	// HeaderSize is sizeof(struct virtio_vsock_hdr): le64 src_cid, le64
	// dst_cid, le32 src_port, le32 dst_port, le32 len, le16 type, le16 op,
	// le32 flags, le32 buf_alloc, le32 fwd_cnt.
	HeaderSize = 44
	// MaxPayload is the largest payload a packet may carry (Linux
	// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
	MaxPayload = 64 << 10

	// TypeStream is VIRTIO_VSOCK_TYPE_STREAM (§5.10.6); SEQPACKET is not
	// supported and gets a reset.
	TypeStream    = 1
	TypeSeqpacket = 2

	// Operations (§5.10.6, enum virtio_vsock_op).
	OpInvalid       = 0
	OpRequest       = 1
	OpResponse      = 2
	OpRst           = 3
	OpShutdown      = 4
	OpRW            = 5
	OpCreditUpdate  = 6
	OpCreditRequest = 7

	// Shutdown flags (§5.10.6.5, VIRTIO_VSOCK_SHUTDOWN_*).
	ShutdownRcv  = 1 // the sender will receive no more data
	ShutdownSend = 2 // the sender will send no more data

	// EventTransportReset is VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (§5.10.6.7):
	// the guest drops every connection and re-reads its CID.
	EventTransportReset = 0
	// eventSize is sizeof(struct virtio_vsock_event): le32 id.
	eventSize = 4

	// HostCID is VMADDR_CID_HOST, the address of the host side (§5.10.4).
	HostCID = 2
)

// Packet errors, counted as invalid packets.
var (
	ErrShortPacket    = errors.New("vsock: packet shorter than its header")
	ErrPayloadLength  = errors.New("vsock: payload length larger than the buffer or MaxPayload")
	ErrNoRxBufferRoom = errors.New("vsock: rx buffer smaller than a packet header")
)

// header is a decoded struct virtio_vsock_hdr.
type header struct {
	srcCID, dstCID   uint64
	srcPort, dstPort uint32
	length           uint32
	typ, op          uint16
	flags            uint32
	bufAlloc, fwdCnt uint32
}

func (h *header) decode(b []byte) {
	h.srcCID = binary.LittleEndian.Uint64(b[0:])
	h.dstCID = binary.LittleEndian.Uint64(b[8:])
	h.srcPort = binary.LittleEndian.Uint32(b[16:])
	h.dstPort = binary.LittleEndian.Uint32(b[20:])
	h.length = binary.LittleEndian.Uint32(b[24:])
	h.typ = binary.LittleEndian.Uint16(b[28:])
	h.op = binary.LittleEndian.Uint16(b[30:])
	h.flags = binary.LittleEndian.Uint32(b[32:])
	h.bufAlloc = binary.LittleEndian.Uint32(b[36:])
	h.fwdCnt = binary.LittleEndian.Uint32(b[40:])
}

func (h *header) encode(b []byte) {
	binary.LittleEndian.PutUint64(b[0:], h.srcCID)
	binary.LittleEndian.PutUint64(b[8:], h.dstCID)
	binary.LittleEndian.PutUint32(b[16:], h.srcPort)
	binary.LittleEndian.PutUint32(b[20:], h.dstPort)
	binary.LittleEndian.PutUint32(b[24:], h.length)
	binary.LittleEndian.PutUint16(b[28:], h.typ)
	binary.LittleEndian.PutUint16(b[30:], h.op)
	binary.LittleEndian.PutUint32(b[32:], h.flags)
	binary.LittleEndian.PutUint32(b[36:], h.bufAlloc)
	binary.LittleEndian.PutUint32(b[40:], h.fwdCnt)
}

// parseTx decodes the packet in a tx chain: the header and the payload may be
// spread over any number of readable descriptors (Linux before 6.3 used two,
// later one). The header is copied out of guest memory before it is used.
func parseTx(c *queue.Chain, h *header) error {
	var b [HeaderSize]byte
	if c.ReadAt(b[:], 0) != HeaderSize {
		return fmt.Errorf("%w: %d bytes", ErrShortPacket, c.ReadableLen())
	}
	h.decode(b[:])
	if h.length > MaxPayload || uint64(h.length) > c.ReadableLen()-HeaderSize {
		return fmt.Errorf("%w: len %d, buffer %d", ErrPayloadLength, h.length, c.ReadableLen()-HeaderSize)
	}
	return nil
}

// writeRx writes header h and payload p (len(p) == h.length) into an rx
// chain's writable buffers and returns the used length.
func writeRx(c *queue.Chain, h *header, p []byte) (uint32, error) {
	if c.WritableLen() < HeaderSize+uint64(len(p)) {
		return 0, fmt.Errorf("%w: %d bytes", ErrNoRxBufferRoom, c.WritableLen())
	}
	var b [HeaderSize]byte
	h.encode(b[:])
	c.WriteAt(b[:], 0)
	c.WriteAt(p, HeaderSize)
	return uint32(HeaderSize + len(p)), nil
}
