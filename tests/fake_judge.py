"""A fake OpenAI-compatible judge: a real HTTP server on 127.0.0.1 answering /v1/chat/completions."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeJudge:
    """``mode``: "score" (1.0 when the answer equals the reference, else 0.25), "garbage" (no score),
    "empty" (an empty message), "no_choices" (``choices: []``), "not_json" (a 200 HTML page),
    "bad_json" (a 200 ``application/json`` body that does not parse), "hang" (never answers until the
    server closes); ``answer_first``: with "hang", answer that many requests normally first;
    ``fail_first``: answer 500 to that many requests first; ``status``: answer every request with it."""

    def __init__(self, mode: str = "score", fail_first: int = 0, status: int | None = None, answer_first: int = 0):
        self.mode, self.fail_first, self.status, self.answer_first = mode, fail_first, status, answer_first
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()  # lets hanging requests end
        self.server.shutdown()
        self.server.server_close()

    @property
    def calls(self) -> int:
        return len(self.requests)

    def _reply(self, body: dict) -> str:
        if self.mode == "garbage":
            return "I would rather not grade this."
        if self.mode == "empty":
            return ""
        user = body["messages"][-1]["content"]
        reference = re.search(r"standard answer: (.*)\n", user).group(1)
        prediction = re.search(r"model's answer: (.*)\n", user, re.DOTALL).group(1)
        return "score: 1.0" if prediction.strip() == reference.strip() else "The answer differs. score: 0.25"

    def _handler(self):
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append(body)
                    failing = judge.fail_first > 0
                    judge.fail_first -= int(failing)
                    hanging = judge.mode == "hang" and len(judge.requests) > judge.answer_first
                if hanging:
                    judge.closing.wait()
                    return
                status = judge.status or (500 if failing else 200)
                if judge.mode in ("not_json", "bad_json") and status == 200:
                    self._send(200, b"<html>upstream proxy error</html>" if judge.mode == "not_json" else b'{"id": ',
                               "text/html" if judge.mode == "not_json" else "application/json")
                    return
                if status != 200:
                    payload = {"error": {"message": f"fake error {status}", "type": "server_error", "code": status}}
                else:
                    payload = {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": judge._reply(body)},
                                "finish_reason": "stop",
                            }
                        ] if judge.mode != "no_choices" else [],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                self._send(status, json.dumps(payload).encode(), "application/json")

            def _send(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def closed_port_url() -> str:
    """A local URL nothing listens on (bound, then released)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()
    return f"http://127.0.0.1:{port}/v1"
