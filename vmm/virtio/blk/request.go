package blk

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/vmm/virtio/queue"
)

// request is the worker's scratch space for one request (struct virtio_blk_req,
// §5.2.6): a 16-byte header in the readable part of the chain, then data
// (readable for OUT, writable for IN/GET_ID), then a status byte that is the
// last byte of the writable part.
type request struct {
	chain queue.Chain
	iov   [][]byte
	hdr   [reqHeaderSize]byte
}

// handle executes one request and returns the used length (bytes written into
// the chain, status byte included).
func (d *Device) handle(r *request) uint32 {
	c := &r.chain
	wlen := c.WritableLen()
	if wlen == 0 {
		d.metrics.InvalidChains.Add(1)
		d.log.Debug("request dropped", "err", ErrNoStatus)
		return 0
	}
	statusOff := wlen - 1
	written, err := d.execute(r, statusOff)
	status := byte(StatusOK)
	switch {
	case errors.Is(err, ErrUnsupportedType):
		status = StatusUnsupp
		d.metrics.Unsupported.Add(1)
	case err != nil:
		status = StatusIOErr
		d.metrics.IOErrors.Add(1)
		d.log.Debug("request failed", "err", err)
	}
	c.WriteAt([]byte{status}, statusOff)
	return uint32(min(written, statusOff)) + 1
}

// execute performs the request; dataLen is the writable bytes before the
// status byte. It returns the data bytes written into the chain.
func (d *Device) execute(r *request, dataLen uint64) (uint64, error) {
	c := &r.chain
	if c.ReadAt(r.hdr[:], 0) != reqHeaderSize {
		return 0, ErrShortHeader
	}
	typ := binary.LittleEndian.Uint32(r.hdr[0:])
	sector := binary.LittleEndian.Uint64(r.hdr[8:])
	switch typ {
	case TypeIn:
		if err := d.checkRange(sector, dataLen); err != nil {
			return 0, err
		}
		r.iov = c.WritableIovecs(r.iov[:0], 0, dataLen)
		if err := rw(d.fd, r.iov, int64(sector*SectorSize), false); err != nil {
			return 0, fmt.Errorf("blk: read %d bytes at sector %d: %w", dataLen, sector, err)
		}
		d.metrics.Reads.Add(1)
		d.metrics.ReadBytes.Add(dataLen)
		return dataLen, nil
	case TypeOut:
		if d.ro {
			return 0, ErrReadOnly
		}
		n := c.ReadableLen() - reqHeaderSize
		if err := d.checkRange(sector, n); err != nil {
			return 0, err
		}
		r.iov = c.ReadableIovecs(r.iov[:0], reqHeaderSize, n)
		if err := rw(d.fd, r.iov, int64(sector*SectorSize), true); err != nil {
			return 0, fmt.Errorf("blk: write %d bytes at sector %d: %w", n, sector, err)
		}
		d.metrics.Writes.Add(1)
		d.metrics.WriteBytes.Add(n)
		return 0, nil
	case TypeFlush:
		d.metrics.Flushes.Add(1)
		if d.ro {
			return 0, nil
		}
		if err := unix.Fdatasync(d.fd); err != nil {
			return 0, fmt.Errorf("blk: flush: %w", err)
		}
		return 0, nil
	case TypeGetID:
		d.metrics.GetIDs.Add(1)
		n := min(dataLen, IDBytes)
		return uint64(c.WriteAt(d.serial[:n], 0)), nil
	default:
		return 0, fmt.Errorf("%w: %d", ErrUnsupportedType, typ)
	}
}

// checkRange validates n data bytes at sector against the disk.
func (d *Device) checkRange(sector, n uint64) error {
	if n%SectorSize != 0 {
		return fmt.Errorf("%w: %d bytes", ErrUnaligned, n)
	}
	if sector > d.capacity || n/SectorSize > d.capacity-sector {
		return fmt.Errorf("%w: sector %d + %d, capacity %d", ErrOutOfRange, sector, n/SectorSize, d.capacity)
	}
	return nil
}

// rw transfers all of iov at off, retrying short transfers and EINTR. A read
// that hits end of file (a disk truncated under the VM) is an error.
func rw(fd int, iov [][]byte, off int64, write bool) error {
	for len(iov) > 0 {
		var n int
		var err error
		if write {
			n, err = unix.Pwritev(fd, iov, off)
		} else {
			n, err = unix.Preadv(fd, iov, off)
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return errors.New("unexpected end of file")
		}
		off += int64(n)
		for n > 0 && len(iov) > 0 {
			if n < len(iov[0]) {
				iov[0] = iov[0][n:]
				n = 0
			} else {
				n -= len(iov[0])
				iov = iov[1:]
			}
		}
	}
	return nil
}
