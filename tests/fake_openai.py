"""A fake OpenAI-compatible server on loopback, and the plain HTTP server under it.

`LoopbackServer` answers each path with a function of the request and
records every request (headers and body) so tests can assert what was
sent. `FakeOpenAI` serves ``POST /v1/chat/completions``: replies queued with
`queue` go first, then `script(request)`; `answer` builds a reply in the
shape the request asked for (one JSON body, or server-sent events cut into
several chunks when the request says ``stream: true``).

A `Reply` with `hold` set is sent only once that event is set: a request can
be kept waiting at a known point (a provider timeout, or a process killed
while it waits). Stopping the server releases every hold.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Union

CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def step(self) -> int:
        """The agent step a chat request asks for: one more than the assistant turns it carries."""
        return 1 + sum(1 for m in self.json["messages"] if m["role"] == "assistant")

    @property
    def streaming(self) -> bool:
        return bool(self.json.get("stream"))


@dataclass
class Reply:
    """What to answer: a status, headers, and a body sent whole or as a list of chunks."""

    status: int = 200
    body: Union[bytes, dict[str, Any], str] = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunks: Optional[list[bytes]] = None
    hold: Optional[threading.Event] = None

    def payload(self) -> bytes:
        if isinstance(self.body, dict):
            return json.dumps(self.body).encode()
        return self.body.encode() if isinstance(self.body, str) else self.body


Responder = Callable[[Recorded], Reply]


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1: `routes` map a path to a responder.

    With `keep_alive`, it speaks HTTP/1.1 as real endpoints do: a connection
    serves request after request, and a reply of chunks is sent with chunked
    transfer encoding (its body ends after the last chunk, as a real
    stream's does after ``[DONE]``). `connections` counts the connections
    it accepted.
    """

    def __init__(self, routes: Optional[dict[str, Responder]] = None, *, keep_alive: bool = False) -> None:
        self.routes: dict[str, Responder] = dict(routes or {})
        self.keep_alive = keep_alive
        self.connections = 0
        self.requests: list[Recorded] = []
        self._holds: list[threading.Event] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def setup(self) -> None:
                with server._lock:
                    server.connections += 1
                super().setup()

            def do_GET(self) -> None:
                server._handle(self)

            def do_POST(self) -> None:
                server._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-server", daemon=True)

    def start(self) -> LoopbackServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        for event in self._holds:
            event.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def hold(self) -> threading.Event:
        """An event for `Reply.hold`; set by the test to send the reply, and at the latest by `stop`."""
        event = threading.Event()
        self._holds.append(event)
        return event

    def requests_to(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        request = Recorded(method=handler.command, path=handler.path.split("?")[0],
                           headers={k.lower(): v for k, v in handler.headers.items()},
                           body=handler.rfile.read(length) if length else b"")
        with self._lock:
            self.requests.append(request)
        responder = self.routes.get(request.path)
        reply = responder(request) if responder else Reply(404, {"error": {"message": f"no route {request.path}"}})
        if reply.hold is not None:
            reply.hold.wait(timeout=60)
        try:
            handler.send_response(reply.status)
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            if reply.chunks is None:
                payload = reply.payload()
                handler.send_header("Content-Length", str(len(payload)))
                handler.end_headers()
                handler.wfile.write(payload)
            elif self.keep_alive:
                handler.send_header("Transfer-Encoding", "chunked")
                handler.end_headers()
                for chunk in [*reply.chunks, b""]:  # the empty chunk ends the body
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    handler.wfile.flush()
            else:
                handler.end_headers()
                for chunk in reply.chunks:
                    handler.wfile.write(chunk)
                    handler.wfile.flush()
        except OSError:  # the client went away (a timeout, a killed process)
            pass


# -- the OpenAI-compatible part -----------------------------------------------------------------------


def native_call(name: str, arguments: Union[dict[str, Any], str], call_id: str) -> dict[str, Any]:
    """A ``tool_calls`` entry; a str `arguments` is sent as is (malformed JSON included)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def usage_block(prompt_tokens: int = 11, completion_tokens: int = 7, cached: int = 3, reasoning: int = 2) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def sse(events: list[Union[dict[str, Any], str]], *, done: bool = True) -> list[bytes]:
    """Server-sent event chunks: one ``data:`` event per item, then ``data: [DONE]``."""
    chunks = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events]
    return chunks + ([b"data: [DONE]\n\n"] if done else [])


def answer(request: Recorded, content: str = "", *, tool_calls: Optional[list[dict[str, Any]]] = None,
           reasoning: str = "", usage: Optional[dict[str, Any]] = None) -> Reply:
    """A completion in the shape `request` asked for.

    Streamed, the content arrives word by word, reasoning first, and each
    tool call's arguments in two fragments (as real servers cut them).
    """
    usage = usage if usage is not None else usage_block()
    finish = "tool_calls" if tool_calls else "stop"
    if not request.streaming:
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        if reasoning:
            message["reasoning_content"] = reasoning
        return Reply(body={"id": "cmpl-1", "object": "chat.completion", "model": request.json["model"],
                           "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage})
    deltas: list[dict[str, Any]] = [{"role": "assistant"}]
    deltas += [{"reasoning_content": piece} for piece in _pieces(reasoning)]
    deltas += [{"content": piece} for piece in _pieces(content)]
    for index, call in enumerate(tool_calls or []):
        arguments = call["function"]["arguments"]
        half = len(arguments) // 2
        deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                       "function": {"name": call["function"]["name"], "arguments": arguments[:half]}}]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": arguments[half:]}}]})
    events: list[Union[dict[str, Any], str]] = [
        {"id": "cmpl-1", "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
        for d in deltas]
    events.append({"id": "cmpl-1", "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    events.append({"id": "cmpl-1", "choices": [], "usage": usage})
    return Reply(headers={"Content-Type": "text/event-stream"}, chunks=sse(events))


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)] if text else []


def error_reply(status: int, message: str, code: str = "error") -> Reply:
    return Reply(status, {"error": {"message": message, "type": code, "code": code}})


class FakeOpenAI(LoopbackServer):
    """``POST /v1/chat/completions``: queued replies first, then `script(request)`."""

    def __init__(self, *, keep_alive: bool = False) -> None:
        super().__init__(keep_alive=keep_alive)
        self.routes[CHAT_PATH] = self._chat
        self.script: Optional[Responder] = None
        self._queue: list[Union[Reply, Responder]] = []

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def queue(self, *replies: Union[Reply, Responder]) -> None:
        """Replies for the next requests, in order (a responder builds one from the request)."""
        with self._lock:
            self._queue.extend(replies)

    @property
    def chats(self) -> list[Recorded]:
        return self.requests_to(CHAT_PATH)

    def steps_asked(self) -> list[int]:
        """The agent step of every chat request so far, in order."""
        return [request.step for request in self.chats]

    def _chat(self, request: Recorded) -> Reply:
        with self._lock:
            queued = self._queue.pop(0) if self._queue else None
        if queued is not None:
            return queued if isinstance(queued, Reply) else queued(request)
        if self.script is not None:
            return self.script(request)
        return error_reply(500, "the fake server has no scripted reply for this request", "test_setup")
