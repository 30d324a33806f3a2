"""Run the code search API with uvicorn: in the foreground (`serve`) or in a background thread."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass

import uvicorn

logger = logging.getLogger(__name__)

# How long an idle keep-alive connection stays open. uvicorn's default (5 s) equals the idle time after
# which pooled HTTP clients (httpx, the IDE clients) drop a connection themselves: a client can then
# send its next request on a connection the server is closing, and gets a reset instead of an answer.
# Longer here than on any usual client side, as nginx's and gunicorn's defaults are.
KEEP_ALIVE_SECONDS = 75


def serve(
    app,
    host: str = "127.0.0.1",
    port: int = 8765,
    log_level: str = "info",
    token: str | None = None,
    allow_no_token: bool = False,
) -> None:
    """Serve until interrupted. `token` is the one `app` checks; see `check_token`."""
    check_token(token, host, allow_no_token)
    if token is None and not _is_loopback(host):
        logger.warning("serving on %s without a token: anyone who can reach it can search the code", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_SECONDS)


def check_token(token: str | None, host: str, allow_no_token: bool = False) -> None:
    """Refuse settings that would leave the service open by mistake: an empty or blank token (an
    unset shell variable), or no token on an address other than loopback without `allow_no_token`."""
    if token is not None and not token.strip():
        raise ValueError("the token is empty: give a non-empty --token (or MBERT_RETRIEVAL_TOKEN)")
    if token is None and not _is_loopback(host) and not allow_no_token:
        raise ValueError(
            f"refusing to serve on {host} without a token: anyone who can reach it could search the "
            "code; give --token, or --allow-no-token to serve without authentication anyway"
        )


@dataclass
class BackgroundServer:
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> BackgroundServer:
    """Start uvicorn in a daemon thread (port 0: a free port) and return once it accepts connections."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    return BackgroundServer(server, thread, f"http://{host}:{bound_port}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
