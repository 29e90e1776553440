"""Run the server: in the foreground (`lmforge serve`), or in a background thread for tests and
scripts.

    with running_server("runs/sft") as url:          # a RUN path, or an app from create_app
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")

`running_server` starts real uvicorn on a free port of 127.0.0.1, waits until GET /health
answers 200 (the model is loaded), yields the base URL and shuts the server down on exit.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from lmforge.serve.app import app_from_run

log = logging.getLogger("lmforge.serve")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, thread: threading.Thread, server: uvicorn.Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError(f"the server at {url} stopped while starting (see the log above)")
        if server.started:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                last = e.read().decode(errors="replace")
                if '"model_not_ready"' in last and "failed" in last:
                    raise RuntimeError(f"the server at {url} could not load its model: {last}") from None
            except OSError as e:
                last = str(e)
        time.sleep(0.05)
    raise TimeoutError(f"the server at {url} was not healthy after {timeout:g} s (last answer: {last})")


@contextlib.contextmanager
def running_server(run_or_app: str | Path | FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 120.0,
                   log_level: str = "warning", **options):
    """Yield "http://HOST:PORT" of a uvicorn server running `run_or_app` in a background thread
    (options go to app_from_run for a RUN path)."""
    app = run_or_app if isinstance(run_or_app, FastAPI) else app_from_run(run_or_app, **options)
    port = port or _free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # not the main thread
    thread = threading.Thread(target=server.run, name="lmforge-uvicorn", daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    try:
        _wait_healthy(url, thread, server, timeout)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def bind_warning(host: str, api_key: str | None) -> str | None:
    """The warning for serving without a key on an address other hosts may reach, or None.
    bind_warning("0.0.0.0", None) -> "warning: serving on 0.0.0.0 without an API key: ..." """
    if api_key is not None or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
    return (f"warning: serving on {host} without an API key: anyone who can reach this address can use the model "
            f"(set one with --api-key-env VAR)")


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, **options) -> None:
    """Serve RUN in the foreground until interrupted (what `lmforge serve` runs)."""
    warning = bind_warning(host, api_key)
    if warning:
        print(warning, file=sys.stderr)
    app = app_from_run(run, api_key=api_key, **options)
    print(f"lmforge serve: http://{host}:{port} (OpenAI API at /v1, chat page at /, health at /health)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
