"""FakeAssistServer: a real HTTP server on loopback speaking the P/D-Device assist protocol
(`POST /v1/device/assist`, pd_serve.gateway.assist_protocol) from a real local engine, with
knobs for the device runtime's tests: a slow first token, the gap between tokens, a connection
dropped after some tokens, a refused handshake.

Lifecycle:
1. `FakeAssistServer(engine, tokenizer_hash, model)` binds a free port; `start()` serves on a
   thread (one request at a time: the engine is single-threaded);
2. each request: validate (400), handshake (409 model_mismatch / tokenizer_mismatch), then
   `meta`, `first` (after `behaviour.first_delay_s`), `refined` (keep the last W positions and
   every other earlier one when rho < 1), one `token` per further token, `end`; a client that
   closes the stream aborts the engine request (counted in `cancelled`);
3. `stop()` shuts the server down; the engine is left idle (`engine.leak_check()` passes).
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import ValidationError

from pd_serve.engine.engine import LLMEngine
from pd_serve.gateway.assist_protocol import (
    ASSIST_PATH,
    AssistEnd,
    AssistEvent,
    AssistFirst,
    AssistMeta,
    AssistRefined,
    AssistRequest,
    AssistToken,
    end_reason,
    sse_event,
)


@dataclass
class FakeBehaviour:
    first_delay_s: float = 0.0
    token_gap_s: float = 0.0
    drop_after_tokens: int | None = None  # close the connection after this many `token` events
    refuse: tuple[int, str] | None = None  # (status, code) for every request


@dataclass
class FakeAssistServer:
    engine: LLMEngine
    tokenizer_hash: str
    model: str
    behaviour: FakeBehaviour = field(default_factory=FakeBehaviour)
    requests: list[AssistRequest] = field(default_factory=list)
    cancelled: int = 0
    tokens_sent: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # one request at a time on the engine
        self._ids = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                fake._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FakeAssistServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ----- one request -----------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        if h.path != ASSIST_PATH:
            return self._refuse(h, 404, "not_found", f"no route {h.path}")
        body = h.rfile.read(int(h.headers.get("Content-Length", "0")))
        try:
            req = AssistRequest.model_validate(json.loads(body))
        except (ValueError, ValidationError) as exc:
            return self._refuse(h, 400, "invalid_request", str(exc)[:300])
        self.requests.append(req)
        b = self.behaviour
        if b.refuse is not None:
            return self._refuse(h, b.refuse[0], b.refuse[1], "refused by the fake")
        if req.model != self.model:
            return self._refuse(h, 409, "model_mismatch", f"model {req.model!r} is not served")
        if req.tokenizer_hash != self.tokenizer_hash:
            return self._refuse(h, 409, "tokenizer_mismatch", "tokenizer hash differs")
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        with self._lock:
            self._stream(h, req)

    def _refuse(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                     "param": None, "code": code}}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _stream(self, h: BaseHTTPRequestHandler, req: AssistRequest) -> None:
        self._ids += 1
        rid = f"fake-{self._ids}"
        params = replace(req.sampling.params(), max_tokens=req.cloud_max_tokens)
        self.engine.add_request(rid, req.prompt_token_ids, params)
        sent: list[int] = []
        self.tokens_sent.append(sent)
        try:
            self._send(h, AssistMeta(request_id=rid, model=self.model,
                                     tokenizer_hash=self.tokenizer_hash,
                                     prompt_tokens=len(req.prompt_token_ids)))
            time.sleep(self.behaviour.first_delay_s)
            self._generate(h, req, rid, sent)
        except (BrokenPipeError, ConnectionResetError):
            self.cancelled += 1
            self.engine.abort(rid)
        finally:
            while self.engine.has_unfinished():
                self.engine.step()

    def _generate(self, h: BaseHTTPRequestHandler, req: AssistRequest, rid: str,
                  sent: list[int]) -> None:
        b = self.behaviour
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.request_id != rid or not out.new_token_ids:
                    continue
                token, reason = out.new_token_ids[0], out.finish_reason
                finish = reason.value if reason is not None else None
                if not sent:
                    self._send(h, AssistFirst(token_id=token, text=out.text_delta,
                                              finished=out.finished, finish_reason=finish))
                    self._send(h, _refined(req))
                else:
                    if b.drop_after_tokens is not None and len(sent) > b.drop_after_tokens:
                        return self._drop(h, rid)
                    time.sleep(b.token_gap_s)
                    self._send(h, AssistToken(index=len(sent), token_id=token,
                                              text=out.text_delta, finished=out.finished,
                                              finish_reason=finish))
                sent.append(token)
                if out.finished:
                    self._send(h, AssistEnd(reason=end_reason(
                        finish, len(sent), req.cloud_max_tokens, req.sampling.max_tokens),
                        cloud_tokens=len(sent)))

    def _drop(self, h: BaseHTTPRequestHandler, rid: str) -> None:
        self.engine.abort(rid)
        h.wfile.flush()
        h.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, h: BaseHTTPRequestHandler, event: AssistEvent) -> None:
        h.wfile.write(sse_event(event).encode())
        h.wfile.flush()


def _refined(req: AssistRequest) -> AssistRefined:
    """All positions with rho = 1; else the last W and every other earlier one, down to rho."""
    n = len(req.prompt_token_ids)
    if req.refine_ratio >= 1.0:
        keep = list(range(n))
    else:
        window = set(range(max(0, n - req.refine_window), n))
        budget = max(math.ceil(req.refine_ratio * n) - len(window), 0)
        keep = sorted(window | set(range(0, n, 2)[:budget]))
    return AssistRefined(keep_indices=keep, ratio_kept=len(keep) / n)
