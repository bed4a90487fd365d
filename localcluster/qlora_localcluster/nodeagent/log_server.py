"""The HTTPS endpoint the API server calls for `kubectl logs`: GET /containerLogs/{ns}/{pod}/{container}.

Query parameters as kubelet takes them: follow, previous, timestamps, tailLines, limitBytes,
sinceSeconds, sinceTime. With a client CA, log requests need a client certificate signed by it
whose subject has O=system:masters or CN=kube-apiserver-kubelet-client (the API server's own
kubelet client identity); /healthz is open. Anything else (exec, attach, port-forward, stats)
answers 404.
"""

from __future__ import annotations

import logging
import select
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

from .logs import LogOptions
from .process_runtime import PodNotFound

log = logging.getLogger(__name__)

AUTHORIZED_CN = "kube-apiserver-kubelet-client"
AUTHORIZED_GROUP = "system:masters"


def parse_log_options(query: str) -> LogOptions:
    q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}

    def flag(name: str) -> bool:
        return name in q and q[name].lower() in ("true", "1", "")

    def number(name: str) -> int | None:
        return int(q[name]) if q.get(name, "") != "" else None

    return LogOptions(
        follow=flag("follow"),
        previous=flag("previous"),
        timestamps=flag("timestamps"),
        tail_lines=number("tailLines"),
        limit_bytes=number("limitBytes"),
        since_seconds=number("sinceSeconds"),
        since_time=q.get("sinceTime") or None,
    )


def client_authorized(cert: dict | None) -> bool:
    if not cert:
        return False
    subject = [attr for rdn in cert.get("subject", ()) for attr in rdn]
    orgs = {v for k, v in subject if k == "organizationName"}
    cns = {v for k, v in subject if k == "commonName"}
    return AUTHORIZED_GROUP in orgs or AUTHORIZED_CN in cns


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LogServer

    def setup(self) -> None:
        self.request.do_handshake()  # in the handler's thread, so a slow client blocks nobody
        super().setup()

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _plain(self, code: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["healthz"]:
            return self._plain(200, "ok")
        if len(parts) != 4 or parts[0] != "containerLogs":
            return self._plain(404, f"not found: {url.path} (this node agent serves only containerLogs)")
        if self.server.verify_clients and not client_authorized(self.request.getpeercert()):
            return self._plain(
                403 if self.request.getpeercert() else 401,
                "a client certificate of the API server is required",
            )
        _, namespace, pod, container = parts
        try:
            opts = parse_log_options(url.query)
            if opts.follow:
                opts.cancel = self._cancel_when_client_leaves()
            chunks = self.server.provider.get_container_logs(namespace, pod, container, opts)
        except ValueError as e:
            return self._plain(400, str(e))
        except PodNotFound as e:
            return self._plain(404, str(e))
        except LookupError as e:  # kubelet answers 400, and the API server then shows the message
            return self._plain(400, str(e.args[0] if e.args else e))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass
        finally:
            if opts.cancel:
                opts.cancel.set()
            self.close_connection = True

    def _cancel_when_client_leaves(self) -> threading.Event:
        """A follower that says nothing is gone once its socket turns readable (FIN or close_notify)."""
        sock, gone = self.request, threading.Event()

        def watch() -> None:
            while not gone.is_set():
                try:
                    if select.select([sock], [], [], 1.0)[0]:
                        gone.set()
                except (OSError, ValueError):
                    gone.set()

        threading.Thread(target=watch, daemon=True, name="log-follow-watch").start()
        return gone


class LogServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: str,
        port: int,
        provider,
        cert_file: str,
        key_file: str,
        client_ca_file: str | None = None,
    ):
        self.provider = provider
        self.verify_clients = bool(client_ca_file)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        if client_ca_file:
            ctx.load_verify_locations(client_ca_file)
            ctx.verify_mode = ssl.CERT_OPTIONAL
        self.ssl_context = ctx
        super().__init__((address, port), _Handler)

    def get_request(self):
        sock, addr = super().get_request()
        return self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address) -> None:
        log.debug("log request from %s failed", client_address, exc_info=True)

    def serve_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="log-server", daemon=True)
        t.start()
        return t
