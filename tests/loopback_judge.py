"""A loopback OpenAI-compatible chat-completions endpoint for the tests that call a judge over HTTP.

``serve(respond)`` runs a threaded HTTP server on 127.0.0.1 and yields its base URL (``.../v1``); each POST to
``/v1/chat/completions`` is parsed and handed to ``respond(handler, body)``, which answers with
``handler.send(status, bytes)`` (or :func:`completion` for a verdict). Any other path gets a 404.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from typing import Callable, Iterator


def completion(content: str, model: str = "judge") -> bytes:
    """A chat.completion response body whose one choice says ``content``."""
    return json.dumps({"id": "cmpl", "object": "chat.completion", "model": model,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]}).encode()


@contextlib.contextmanager
def serve(respond: Callable[[http.server.BaseHTTPRequestHandler, dict], None]) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def send(self, code: int, data: bytes) -> None:
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                return self.send(404, b"{}")
            respond(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
