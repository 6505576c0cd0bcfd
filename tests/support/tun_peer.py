# A TCP peer written by hand behind a TUN device: it sends the exact segments a test names (a partial
# retransmit, say), which no socket API can be made to send. The kernel sees an ordinary remote host
# at PEER_IP on a point-to-point link; this module builds and parses the IPv4/TCP headers itself.
# Invariant: used only inside a namespace the test created (tests.support.netns.private_netns), so
# nothing it sends can leave the machine; the device goes with the namespace.
from __future__ import annotations

import fcntl
import os
import select
import struct

from tests.support.netns import netns, sh

LOCAL_IP = "10.213.0.1"  # the kernel's end (the address a listener binds)
PEER_IP = "10.213.0.2"  # this peer's address

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def internet_checksum(data: bytes) -> int:
    """RFC 1071: the ones' complement sum IPv4, TCP and ICMP use."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ip(addr: str) -> bytes:
    return bytes(int(part) for part in addr.split("."))


class TunPeer:
    """One TCP connection from PEER_IP:peer_port to LOCAL_IP:port, driven segment by segment.
    Sequence numbers are relative to the peer's ISN: send(0, b"abc") sends the first 3 bytes."""

    def __init__(self, ns: str, name: str = "tunpeer0", peer_port: int = 40000, isn: int = 1_000_000) -> None:
        with netns(ns):  # the device is created in the calling thread's namespace
            self.fd = os.open("/dev/net/tun", os.O_RDWR)
            fcntl.ioctl(self.fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
        sh("ip", "-n", ns, "addr", "add", LOCAL_IP, "peer", PEER_IP, "dev", name)
        sh("ip", "-n", ns, "link", "set", name, "up")
        self.peer_port = peer_port
        self.isn = isn
        self.port = 0
        self.remote_next = 0  # the kernel's next sequence number (what we acknowledge)

    def close(self) -> None:
        os.close(self.fd)

    def _segment(self, seq: int, flags: int, payload: bytes = b"", ack: int = 0) -> bytes:
        tcp = struct.pack("!HHIIBBHHH", self.peer_port, self.port, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                          5 << 4, flags, 65535, 0, 0) + payload
        pseudo = _ip(PEER_IP) + _ip(LOCAL_IP) + struct.pack("!BBH", 0, 6, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", internet_checksum(pseudo + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
                         _ip(PEER_IP), _ip(LOCAL_IP))
        ip = ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:]
        return ip + tcp

    def _read_segment(self, timeout: float) -> tuple[int, int, int] | None:
        """(flags, seq, payload length) of the next TCP segment the kernel sent us, or None."""
        while True:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return None
            packet = os.read(self.fd, 65536)
            if len(packet) < 40 or packet[0] >> 4 != 4 or packet[9] != 6:
                continue  # not IPv4/TCP (router solicitations and the like)
            ihl = (packet[0] & 0x0F) * 4
            total = struct.unpack("!H", packet[2:4])[0]
            sport, dport, seq, _ack, off, flags = struct.unpack("!HHIIBB", packet[ihl:ihl + 14])
            if sport != self.port or dport != self.peer_port:
                continue
            return flags, seq, total - ihl - (off >> 4) * 4

    def connect(self, port: int, timeout: float = 5.0) -> None:
        """The three-way handshake with a listener on LOCAL_IP:port (the kernel completes it alone;
        accept() then returns the socket)."""
        self.port = port
        os.write(self.fd, self._segment(self.isn, SYN))
        while True:
            got = self._read_segment(timeout)
            assert got is not None, "no SYN-ACK from the listener"
            flags, seq, _ = got
            if flags & (SYN | ACK) == SYN | ACK:
                break
        self.remote_next = seq + 1
        os.write(self.fd, self._segment(self.isn + 1, ACK, ack=self.remote_next))

    def send(self, offset: int, payload: bytes, flags: int = ACK | PSH) -> None:
        """A segment carrying payload at stream offset `offset` (0 = the first byte after the SYN)."""
        os.write(self.fd, self._segment(self.isn + 1 + offset, flags, payload, ack=self.remote_next))

    def fin(self, offset: int) -> None:
        os.write(self.fd, self._segment(self.isn + 1 + offset, FIN | ACK, ack=self.remote_next))

    def drain(self) -> None:
        """Throw away what the kernel sent (ACKs): the device's queue is bounded."""
        while self._read_segment(0) is not None:
            pass
