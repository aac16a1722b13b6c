"""The OpenAI engine honours `Retry-After` (a real HTTP server on 127.0.0.1 answering 429 first)."""
import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from persqa_ray.engines.base import GenerationRequest
from persqa_ray.engines.openai_engine import OpenAIEngine


def test_retry_after_is_honoured():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(time.monotonic())
            if len(seen) == 1:
                self.send_response(429)
                self.send_header("Retry-After", "1.5")
                self.send_header("Content-Type", "application/json")
                body = b'{"error": {"message": "slow down"}}'
            else:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": "<mam> hi."}}],
                                   "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        eng = OpenAIEngine("m", base_url=f"http://127.0.0.1:{server.server_port}/v1", max_attempts=3,
                           backoff_s=0.01, request_timeout_s=10, structured="none")
        req = GenerationRequest(system_prompt="s", user_prompt="q", images=[np.zeros((28, 28, 3), np.uint8)])
        res = asyncio.run(eng.agenerate([req]))[0]
    finally:
        server.shutdown()
    assert res.error is None and res.text == "<mam> hi."
    assert len(seen) == 2 and seen[1] - seen[0] >= 1.4  # waited as asked, not the 10 ms backoff
