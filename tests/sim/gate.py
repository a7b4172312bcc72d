"""A TCP gate on loopback in front of a real server (moto S3 standing in for R2): open, it relays
bytes both ways; closed, it takes each connection and drops it at once, which is what a client sees of
an endpoint that is down (botocore: "connection was closed"; curl / urllib: a reset). Threads, so it
keeps working while the test's event loop is busy."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit


class Gate:
    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.is_open = True
        self.refused = 0  # connections dropped while closed
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="gate", daemon=True)
        self._thread.start()

    def close_gate(self) -> None:
        self.is_open = False

    def open_gate(self) -> None:
        self.is_open = True

    def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._listener.close()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if not self.is_open:
                self.refused += 1
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    conn.close()
                continue
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self._target, timeout=10)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
        back.start()
        pump(conn, upstream)
        back.join()
        conn.close()
        upstream.close()


@contextlib.contextmanager
def gate(target_url: str) -> Iterator[Gate]:
    g = Gate(target_url)
    try:
        yield g
    finally:
        g.stop()
