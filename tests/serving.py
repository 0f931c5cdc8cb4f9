"""A real server for tests: `adapters.openai_server.create_app` under uvicorn, on 127.0.0.1 and a
free port, in a thread of the test process (so it shares the session's engine)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from adapters.openai_server import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(engine: Any, **options: Any) -> Iterator[str]:
    """The base URL (http://127.0.0.1:PORT) of a server over `engine` while the block runs."""
    port = free_port()
    config = uvicorn.Config(create_app(engine, **options), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
