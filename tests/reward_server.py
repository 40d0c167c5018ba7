"""A small scoring server on loopback in LLaMA-Factory's reward API shape, for ppo with reward_model_type api:
POST {"model": ..., "messages": [text, ...]} -> {"scores": [...]}. Bounded: it answers until the test stops it."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextmanager
def scoring_server(score: Callable[[str], float], key: str | None = None) -> Iterator[tuple[str, list[dict]]]:
    """(URL, the requests it received); each text is scored by `score`; a wrong bearer key gets 401."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append({"body": body, "authorization": self.headers.get("Authorization")})
            if key and self.headers.get("Authorization") != f"Bearer {key}":
                self._answer(401, {"error": "bad key"})
                return
            self._answer(200, {"scores": [score(text) for text in body["messages"]]})

        def _answer(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/score/evaluation", received
    finally:
        server.shutdown()
        server.server_close()
