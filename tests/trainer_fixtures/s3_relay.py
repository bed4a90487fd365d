"""A TCP relay between the trainer and a test's MinIO that sees which S3 requests pass through it.

The trainer's endpoint is the relay's port; every byte is forwarded unchanged, so the store the
trainer talks to is the real one. What the relay adds is timing: `when(method, path_pattern, action)`
runs `action` as the matching request reaches the relay, before it is forwarded. A test can thus
stop the store, or signal the trainer, at an exact point of a download, a checkpoint upload or a
publication, instead of guessing from log lines how far the trainer has got. It can also lose
the answer to one request (the store carried it out, the trainer never hears so): the write that
lands as the store goes away. While the store is down the relay accepts connections and closes them
at once, as a load balancer with no backend does.
"""

import re
import socket
import threading
from dataclasses import dataclass, field

from trainer_fixtures.s3_server import free_port

_REQUEST_LINE = re.compile(rb"(?:^|\r\n)(GET|PUT|POST|HEAD|DELETE) (/\S*) HTTP/1\.[01]\r\n")


@dataclass
class _Trigger:
    method: str
    path: re.Pattern
    action: object
    nth: int = 1  # fire on the nth matching request
    lose_answer: bool = False  # the store gets the request; its answer never reaches the trainer
    seen: int = 0
    fired: threading.Event = field(default_factory=threading.Event)


class S3Relay:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self._triggers: list[_Trigger] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def when(self, method: str, path_pattern: str, action=None, nth: int = 1, lose_answer: bool = False
             ) -> threading.Event:
        """Run `action()` as the nth request matching (method, path regex) arrives, before it is
        forwarded; the event is set once it has run. With lose_answer, the request is forwarded and
        carried out, and the connection is closed instead of passing its answer on: a write that
        landed as the store or the network went away, which the trainer can only retry."""
        trigger = _Trigger(method, re.compile(path_pattern), action, nth, lose_answer)
        with self._lock:
            self._triggers.append(trigger)
        return trigger.fired

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    # -- forwarding -------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            client.close()  # the store is down: the trainer sees its connection closed
            return
        upstream.settimeout(None)
        connection = {"lose_answer": False}
        threading.Thread(target=self._pump, args=(upstream, client, connection, False), daemon=True).start()
        self._pump(client, upstream, connection, True)

    def _pump(self, source: socket.socket, sink: socket.socket, connection: dict, from_trainer: bool) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                if from_trainer:
                    connection["lose_answer"] |= self._observe(chunk)
                elif connection["lose_answer"]:
                    break  # the answer is dropped and the trainer's connection closed
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _observe(self, chunk: bytes) -> bool:
        """Record the requests in a chunk from the trainer and fire their triggers; whether the
        answer to this chunk's request is to be lost."""
        lose_answer = False
        for match in _REQUEST_LINE.finditer(chunk):
            method, path = match.group(1).decode(), match.group(2).decode()
            due = []
            with self._lock:
                self.requests.append((method, path))
                for t in self._triggers:
                    if not t.fired.is_set() and t.method == method and t.path.search(path):
                        t.seen += 1
                        if t.seen == t.nth:
                            due.append(t)
            for t in due:
                if t.action is not None:
                    t.action()
                lose_answer |= t.lose_answer
                t.fired.set()
        return lose_answer
