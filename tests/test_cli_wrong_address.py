"""The CLI pointed at something that is not the controller: a server that does not speak
HTTP, a web server answering HTML or other JSON, an address urllib cannot parse. Each is a
one-line error with a hint, never a traceback. Real sockets on loopback, no controller."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main


class _Answers(BaseHTTPRequestHandler):
    """Answers GET with the body its server was given, whatever the path."""

    def do_GET(self) -> None:
        status, body = self.server.answer  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def web() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def not_http() -> Iterator[int]:
    """A TCP server that greets like SSH and hangs up: no HTTP status line at all."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                conn.recv(4096)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def _run(tmp_path: Path, api: str, *args: str) -> str:
    env = {"ORKESTR_CONFIG": str(tmp_path / "c.json"), "ORKESTR_API": api, "ORKESTR_TOKEN": "t"}
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "hint: check the address (`orkestr login --api URL`)" in result.output, result.output
    return result.output


def test_a_server_that_does_not_speak_http(tmp_path: Path, not_http: int) -> None:
    out = _run(tmp_path, f"http://127.0.0.1:{not_http}", "projects")
    assert "cannot reach the API at" in out


@pytest.mark.parametrize(
    "body",
    [b"<html><body>It works!</body></html>", b"[1, 2]", b'{"projects": "none"}', b"\xff\xfe"],
)
def test_a_web_server_that_is_not_the_api(
    tmp_path: Path, web: ThreadingHTTPServer, body: bytes
) -> None:
    web.answer = (200, body)  # type: ignore[attr-defined]
    out = _run(tmp_path, f"http://127.0.0.1:{web.server_port}", "projects")
    assert "not as the orkestr API does" in out or "without its 'projects' list" in out


def test_a_web_servers_404_is_not_blamed_on_the_name(
    tmp_path: Path, web: ThreadingHTTPServer
) -> None:
    web.answer = (404, b"<html>Not Found</html>")  # type: ignore[attr-defined]
    out = _run(tmp_path, f"http://127.0.0.1:{web.server_port}", "addons", "list", "-p", "shop")
    assert "check the name or id" not in out


@pytest.mark.parametrize("api", ["http://[::1", "http://127.0.0.1:99999", "http://127.0.0.1:0"])
def test_an_address_urllib_cannot_use(tmp_path: Path, api: str) -> None:
    out = _run(tmp_path, api, "projects")
    assert "is not a valid URL" in out
