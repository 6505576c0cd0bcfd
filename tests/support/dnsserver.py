# A real DNS server on loopback for tests (dnslib on UDP and TCP), with answers the test controls and
# a count of the queries it received, so single-flight and caching can be checked at the server.
from __future__ import annotations

import collections
import socket
import threading

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord


class DnsServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.records: dict[tuple[str, str], tuple[list[str], int]] = {}
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.silent = False  # drop every query: a server that does not answer
        self._lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # UDP and TCP on one port: a free UDP port may be taken for TCP, so retry until both bind.
        for _ in range(50):
            self._udp = socket.socket(family, socket.SOCK_DGRAM)
            self._udp.bind((host, 0))
            self.port = self._udp.getsockname()[1]
            self._tcp = socket.socket(family, socket.SOCK_STREAM)
            self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self._tcp.bind((host, self.port))
                break
            except OSError:
                self._udp.close()
                self._tcp.close()
        else:
            raise OSError("no port free for both UDP and TCP")
        self._tcp.listen(16)
        self._stopping = False
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]
        for t in self._threads:
            t.start()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def add(self, name: str, addresses: list[str], ttl: int = 300) -> None:
        v4 = [a for a in addresses if ":" not in a]
        v6 = [a for a in addresses if ":" in a]
        with self._lock:
            self.records[(name.lower(), "A")] = (v4, ttl)
            self.records[(name.lower(), "AAAA")] = (v6, ttl)

    def count(self, name: str) -> int:
        with self._lock:
            return sum(n for (qname, _), n in self.queries.items() if qname == name.lower())

    def answer(self, data: bytes) -> bytes | None:
        request = DNSRecord.parse(data)
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries[(qname, qtype)] += 1
            if self.silent:
                return None
            known = any(key[0] == qname for key in self.records)
            addresses, ttl = self.records.get((qname, qtype), ([], 0))
        reply = request.reply()
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
        for address in addresses:
            rdata = AAAA(address) if qtype == "AAAA" else A(address)
            reply.add_answer(RR(request.q.qname, request.q.qtype, rdata=rdata, ttl=ttl))
        return reply.pack()

    def _serve_udp(self) -> None:
        while not self._stopping:
            try:
                data, peer = self._udp.recvfrom(4096)
            except OSError:
                return
            if self._stopping or not data:
                return
            reply = self.answer(data)
            if reply is not None:
                try:
                    self._udp.sendto(reply, peer)
                except OSError:  # closed by close() while answering: the server is stopping
                    return

    def _serve_tcp(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._tcp.accept()
            except OSError:
                return
            with conn:
                try:
                    length = int.from_bytes(conn.recv(2), "big")
                    reply = self.answer(conn.recv(length))
                    if reply is not None:
                        conn.sendall(len(reply).to_bytes(2, "big") + reply)
                except OSError:
                    pass

    def close(self) -> None:
        self._stopping = True
        for sock in (self._udp, self._tcp):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for t in self._threads:
            t.join(timeout=2)
