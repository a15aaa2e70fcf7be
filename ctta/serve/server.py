"""Run a served adapter under uvicorn, with the shutdown a deployment needs.

On SIGTERM or SIGINT: `/readyz` turns 503 and new predictions are refused with 503 ``shutting_down`` at once (a load
balancer stops sending, a client retries elsewhere); uvicorn stops accepting connections and waits for the requests
it holds (at most ``drain_timeout_s``: a request still open then is cancelled, though if it was already queued the
model still serves it); the app's lifespan then serves whatever is still queued and writes the adapted state (atomic,
`OnlineAdapter.save`) before the process exits. A second SIGINT forces an immediate exit without the final write
(uvicorn's convention), so the last periodic or /snapshot file is what survives then.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import uvicorn

from ctta.online import OnlineAdapter
from ctta.serve.app import create_app
from ctta.serve.options import ServeOptions, StateError
from ctta.serve.service import Service


class _Server(uvicorn.Server):
    """uvicorn's server, telling the service it drains the moment a signal arrives (uvicorn itself only stops
    accepting new connections; requests on open keep-alive connections would otherwise still be taken)."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.service.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn re-raises the signal it stopped on once it has shut down, so the process ends as a clean
        SIGTERM would; when the final save failed, it must not look clean: `serve` raises instead."""
        with super().capture_signals():
            yield
            if self.service.save_error is not None:
                self._captured_signals.clear()


def serve(adapter: OnlineAdapter, options: ServeOptions | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", on_ready: Any = None) -> None:
    """Serve ``adapter`` over HTTP until SIGTERM / SIGINT (see the module docstring). The state file, when
    ``options.state_path`` exists, is loaded before the port opens (`StateError` if it is refused). ``host``: keep
    127.0.0.1 unless a proxy or the network in front of it is trusted; the server has no authentication."""
    service = Service(adapter, options)
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=service.options.drain_timeout_s)
    _Server(config, service).run()
    if service.save_error is not None:
        raise StateError(service.save_error)
