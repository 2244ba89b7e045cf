"""A service's health and metrics endpoint in the Prometheus text format (``prometheus_client``).

Counted from the same records as the audit log, so the two never disagree. Labels carry the
service role, model name, outcome and refusal code only: never a peer's identity or address
(who used what stays in the audit log, which the operator controls), never anything about the
images. The endpoint is plain HTTP: bind it to loopback or a monitoring network
(``metrics = "127.0.0.1:9100"`` in the service file). ``GET /metrics`` answering at all is the
health check; ``privmed_sessions_active`` / ``privmed_session_slots`` say how full it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from privmed.errors import ConfigError

SECONDS_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class ServiceMetrics:
    """Prometheus collectors in a registry of their own (no global state)."""

    def __init__(self, role: str, max_sessions: int, active: Callable[[], float]) -> None:
        try:
            import prometheus_client as prom
        except ModuleNotFoundError as exc:
            raise ConfigError("the service file asks for metrics, which need prometheus-client (pip install 'privmed[service]')") from exc
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        self.role = role
        labels = ["service"]
        self.sessions = prom.Counter("privmed_sessions", "Sessions ended, by outcome (ok, failed)", [*labels, "model", "outcome"],
                                     registry=self.registry)  # fmt: skip
        self.refusals = prom.Counter("privmed_refusals", "Requests refused, by code (busy, not-allowed, ...)", [*labels, "code"],
                                     registry=self.registry)  # fmt: skip
        self.images = prom.Counter("privmed_images", "Images in sessions that completed", [*labels, "model"], registry=self.registry)
        self.bytes = prom.Counter("privmed_bytes", "Bytes sent and received by sessions", [*labels, "direction"], registry=self.registry)
        self.seconds = prom.Histogram("privmed_session_seconds", "Wall time of sessions that ran", [*labels, "outcome"],
                                      buckets=SECONDS_BUCKETS, registry=self.registry)  # fmt: skip
        prom.Gauge("privmed_sessions_active", "Sessions holding a slot now", labels, registry=self.registry).labels(role).set_function(active)
        prom.Gauge("privmed_session_slots", "max_sessions of the service file", labels, registry=self.registry).labels(role).set(max_sessions)
        prom.ProcessCollector(registry=self.registry)  # memory, CPU, open files of the service process
        self._server: Any = None

    def record(self, rec: dict[str, Any]) -> None:
        """Count one audit record."""
        outcome = str(rec.get("outcome", ""))
        if outcome == "refused":
            self.refusals.labels(self.role, str(rec.get("code", ""))).inc()
            return
        model = str(rec.get("model", ""))
        self.sessions.labels(self.role, model, outcome).inc()
        if outcome == "ok":
            self.images.labels(self.role, model).inc(int(rec.get("images", 0)))
        for direction in ("sent", "recv"):
            self.bytes.labels(self.role, direction).inc(int(rec.get(f"bytes_{direction}", 0)))
        if "wall_s" in rec:
            self.seconds.labels(self.role, outcome).observe(float(rec["wall_s"]))

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (a daemon thread); returns the bound port."""
        try:
            self._server, _thread = self._prom.start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"{self.role} service: cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def parse_address(text: str, where: str) -> tuple[str, int]:
    """``"host:port"`` (IPv6 as ``"[::1]:9100"``) of the metrics endpoint."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where} [service]: 'metrics' must be \"host:port\", got {text!r}")
    return host, int(port)
