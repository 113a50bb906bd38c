package vhostuser

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// Message is one vhost-user message: a header, its payload, and the file
// descriptors that came with it as SCM_RIGHTS ancillary data. Received
// descriptors belong to the receiver, who must close them.
type Message struct {
	Header
	Payload []byte
	FDs     []int
}

// closeFDs closes every descriptor m carries.
func (m *Message) closeFDs() {
	for _, fd := range m.FDs {
		unix.Close(fd)
	}
	m.FDs = nil
}

// conn reads and writes messages on a unix stream socket.
type conn struct {
	c *net.UnixConn
}

// send writes m in one sendmsg, with its fds as SCM_RIGHTS on its first
// byte, as the specification has it.
func (c *conn) send(m Message) error {
	h := m.Header
	h.Size = uint32(len(m.Payload))
	b := append(h.encode(make([]byte, 0, HeaderSize+len(m.Payload))), m.Payload...)
	var oob []byte
	if len(m.FDs) > 0 {
		oob = unix.UnixRights(m.FDs...)
	}
	n, oobn, err := c.c.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return fmt.Errorf("vhostuser: sending %v: %w", m.Request, err)
	}
	if n != len(b) || oobn != len(oob) {
		return fmt.Errorf("vhostuser: sending %v: short write (%d of %d bytes): %w", m.Request, n, len(b), io.ErrShortWrite)
	}
	return nil
}

// recv reads one message. Its header is read with room for more
// descriptors than any message may carry, so too many is an error rather
// than a silent truncation. On an error no descriptor is left open. A
// closed connection before a header is io.EOF.
func (c *conn) recv() (Message, error) {
	var m Message
	hb := make([]byte, HeaderSize)
	oob := make([]byte, unix.CmsgSpace(4*(maxFDs+8)))
	n, oobn, flags, _, err := c.c.ReadMsgUnix(hb, oob)
	if oobn > 0 {
		fds, perr := parseRights(oob[:oobn])
		m.FDs = fds
		if perr != nil {
			m.closeFDs()
			return Message{}, perr
		}
	}
	fail := func(err error) (Message, error) {
		m.closeFDs()
		return Message{}, err
	}
	if err != nil {
		if n == 0 && errors.Is(err, io.EOF) {
			return fail(io.EOF)
		}
		return fail(fmt.Errorf("vhostuser: reading a message: %w", err))
	}
	if n == 0 {
		return fail(io.EOF)
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return fail(malformed(0, "more than %d file descriptors (ancillary data truncated)", maxFDs+8))
	}
	if n < HeaderSize {
		if _, err := io.ReadFull(c.c, hb[n:]); err != nil {
			return fail(fmt.Errorf("vhostuser: reading a header: %w", noEOF(err)))
		}
	}
	h, err := DecodeHeader(hb)
	if err != nil {
		return fail(err)
	}
	m.Header = h
	if len(m.FDs) > maxFDs {
		return fail(malformed(h.Request, "%d file descriptors, at most %d", len(m.FDs), maxFDs))
	}
	m.Payload = make([]byte, h.Size)
	if _, err := io.ReadFull(c.c, m.Payload); err != nil {
		return fail(fmt.Errorf("vhostuser: reading %v's %d-byte payload: %w", h.Request, h.Size, noEOF(err)))
	}
	return m, nil
}

// noEOF turns an EOF inside a message into ErrUnexpectedEOF.
func noEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// parseRights returns the descriptors of SCM_RIGHTS messages in oob; any
// other control message is an error (after collecting what fds there are,
// so the caller can close them).
func parseRights(oob []byte) ([]int, error) {
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("vhostuser: parsing ancillary data: %w", os.NewSyscallError("recvmsg", err))
	}
	var fds []int
	var bad error
	for _, cm := range cmsgs {
		if cm.Header.Level != unix.SOL_SOCKET || cm.Header.Type != unix.SCM_RIGHTS {
			bad = malformed(0, "ancillary data of level %d type %d, want SCM_RIGHTS", cm.Header.Level, cm.Header.Type)
			continue
		}
		got, err := unix.ParseUnixRights(&cm)
		if err != nil {
			bad = fmt.Errorf("vhostuser: parsing SCM_RIGHTS: %w", err)
			continue
		}
		fds = append(fds, got...)
	}
	return fds, bad
}
