"""A TlsBackend (tests/support/backends.py) in its own process, so a test can kill it for real:
`python -m tests.support.tls_server_proc NAME HOST PORT CERT_AND_KEY_PEM [ALPN,...]` prints
`ready PORT` once it listens, and serves until killed."""
from __future__ import annotations

import asyncio
import ssl
import sys

from tests.support.backends import TlsBackend


async def main(name: str, host: str, port: int, pem: str, alpn: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem)
    ctx.set_alpn_protocols(alpn.split(","))
    backend = await TlsBackend(name, ctx, host=host, port=port).start()
    print(f"ready {backend.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(args[0], args[1], int(args[2]), args[3], args[4] if len(args) > 4 else "http/1.1"))
