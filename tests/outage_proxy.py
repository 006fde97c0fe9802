"""A loopback TCP proxy in front of a local S3 server that can stop answering: refuse connections
(and drop the open ones), or hang (accept, forward nothing), then recover. For outage tests only."""

from __future__ import annotations

import socket
import threading
import time


class OutageProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.state = "up"  # up | refusing | hanging
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = self._listen(0)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        return listener

    def _accept(self) -> None:
        while True:
            listener = self.listener
            try:
                client, _ = listener.accept()
            except OSError:  # closed while refusing: wait to listen again
                time.sleep(0.05)
                continue
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.connections += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self.state == "hanging":
                    time.sleep(0.05)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass

    def _drop_connections(self) -> None:
        with self.lock:
            for s in self.connections:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.connections = []

    def refuse(self) -> None:
        """Connections are refused and the open ones dropped, as when the store's host is down."""
        self.state = "refusing"
        self.listener.close()
        self._drop_connections()

    def hang(self) -> None:
        """Connections are accepted but nothing is forwarded, as when the store stops answering."""
        self.state = "hanging"

    def recover(self) -> None:
        if self.state == "refusing":
            self.listener = self._listen(self.port)
        self.state = "up"
