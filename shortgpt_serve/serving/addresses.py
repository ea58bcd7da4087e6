"""Addresses and ports the launcher binds or reaches: checked before minutes of work, and turned into URLs."""

from __future__ import annotations

import ipaddress
import socket

from shortgpt_serve.config import ServeConfig
from shortgpt_serve.errors import ServeError


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Fail early, before minutes of profiling, if the port cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServeError(
            f"--host {host} cannot be resolved ({exc.strerror}); use an IP address such as 127.0.0.1."
        ) from exc
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise ServeError(
                f"{flag} {port} on {host} is already in use ({exc.strerror}); "
                f"stop what uses it or pass another {flag}.",
                param=flag,
            ) from exc


def check_serve_ports(cfg: ServeConfig) -> None:
    """Both ports the launcher binds, --port and (when on) --metrics-port: fail now, not after minutes of work."""
    check_port_free(cfg.host, cfg.port, "--port")
    if cfg.metrics_port:
        check_port_free(cfg.host, cfg.metrics_port, "--metrics-port")


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine's loopback addresses (127.0.0.0/8, ::1, localhost)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return bool(infos) and all(ipaddress.ip_address(str(info[4][0])).is_loopback for info in infos)
    except (socket.gaierror, ValueError):
        return False


def local_url(host: str, port: int) -> str:
    """A URL that reaches a server bound to ``host`` from this machine."""
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
