"""A loopback OpenAI-style completions/chat server over a real model, for the deploy-check and monitor tests.

GET /v1/models, POST /v1/completions and /v1/chat/completions, greedy only (temperature 0), answered by
jielong's own Generator. `swap()` serves another model from the next request on; `stop()` closes the port.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ModelServer:
    def __init__(self, model_dir: Path, port: int = 0):
        self.lock = threading.Lock()
        self.swap(model_dir)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def swap(self, model_dir: Path) -> None:
        from jielong.models.generate import Generator

        generator = Generator(model_dir, "cpu")
        with self.lock:
            self.generator = generator

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, path: str, body: dict) -> dict:
        if body.get("temperature", 1) != 0:
            raise ValueError("this server decodes greedily only: send temperature 0")
        with self.lock:
            if path == "/v1/chat/completions":
                text = self.generator.reply(body["messages"], int(body["max_tokens"]))
                return {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
            text = self.generator.continue_text(body["prompt"], int(body["max_tokens"]))
            return {"object": "text_completion", "choices": [{"index": 0, "text": text}]}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    return self.reply(200, {"object": "list", "data": [{"id": "jielong", "object": "model"}]})
                self.reply(404, {"error": "not found"})

            def do_POST(self):
                if self.path not in ("/v1/completions", "/v1/chat/completions"):
                    return self.reply(404, {"error": "not found"})
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    self.reply(200, server.answer(self.path, body))
                except (ValueError, KeyError) as err:
                    self.reply(400, {"error": str(err)})

        return Handler



if __name__ == "__main__":  # the README's demo: python tests/openai_server.py MODEL PORT [--set k=v ...]; Ctrl-C stops
    import sys
    import time

    from jielong.flows.deploy import model_folder
    from jielong.tasks.config import load_config

    served = ModelServer(model_folder(sys.argv[1], load_config("tiny", sys.argv[4::2])), int(sys.argv[2]))
    print(f"serving {sys.argv[1]} at {served.url}", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        served.stop()
