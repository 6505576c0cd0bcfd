# A real plain-HTTP backend (the standard library's ThreadingHTTPServer) for http listener tests: it
# names itself and echoes the Host it was sent, and answers a POST with the body's length and SHA-256,
# so a test can see which backend a request reached and that the proxy forwarded it byte for byte.
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HttpBackend:
    def __init__(self, name: str, host: str = "127.0.0.1") -> None:
        self.name = name
        self.requests: list[dict[str, str]] = []
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - the standard library's name
                host = self.headers.get("Host", "")
                backend.requests.append({"method": "GET", "path": self.path, "host": host})
                self._answer(f"backend={backend.name} host={host} path={self.path}\n".encode())

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                backend.requests.append({"method": "POST", "path": self.path,
                                         "host": self.headers.get("Host", "")})
                digest = hashlib.sha256(body).hexdigest()
                self._answer(f"backend={backend.name} received={len(body)} sha256={digest}\n".encode())

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"http-{name}",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
