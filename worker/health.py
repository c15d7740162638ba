"""/metrics, /healthz and /readyz on one port, served from a thread so that a busy or
stuck event loop cannot hide behind its own health check."""

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.metrics import Metrics

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


@dataclass
class Readiness:
    """What /readyz reports; written by the worker's loop, read by the server thread."""

    postgres: bool = False
    rabbitmq: bool = False
    consuming: bool = False
    # False while the broker refuses or returns dead letters (they wait unacked and are
    # retried); dead_letter_problem says why: refused, unroutable or an error's name.
    dead_letters: bool = True
    dead_letter_problem: str | None = None
    heartbeat: float = 0.0  # monotonic time of the loop's last probe

    def ready(self) -> bool:
        return self.postgres and self.rabbitmq and self.consuming and self.dead_letters

    def alive(self, stale_after: float) -> bool:
        return time.monotonic() - self.heartbeat < stale_after


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the log."""


class HealthServer:
    def __init__(
        self, host: str, port: int, metrics: Metrics, readiness: Readiness, stale_after: float
    ) -> None:
        self._metrics = metrics
        self._readiness = readiness
        self._stale_after = stale_after
        self._server = make_server(host, port, self._app, _Server, _QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body = generate_latest(self._metrics.registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        if path == "/healthz":
            alive = self._readiness.alive(self._stale_after)
            return self._json(start_response, alive, {"alive": alive})
        if path == "/readyz":
            state = self._readiness
            return self._json(
                start_response, state.ready(), {"ready": state.ready(), **asdict(state)}
            )
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    @staticmethod
    def _json(start_response: StartResponse, ok: bool, body: dict[str, Any]) -> list[bytes]:
        body.pop("heartbeat", None)
        start_response(
            "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")]
        )
        return [json.dumps(body).encode() + b"\n"]
