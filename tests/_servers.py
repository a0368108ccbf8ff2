"""A real uvicorn server on a thread for the serving tests, on a socket bound to 127.0.0.1:0
(listening before the server starts, so a test can connect at once)."""

from __future__ import annotations

import socket
import threading

import uvicorn

from gie_guard.serving.http import server_config


class Running:
    def __init__(self, app, *, backlog: int = 128, **config) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        settings = dict(log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=10, **config)
        self.server = uvicorn.Server(server_config(app, **settings))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive()
