"""Every finalizer that any version of an object carried while a test ran, not only at the moments the
test looked: `kubectl get <kind> --watch -o json` streams each version the API server stores.

    with FinalizerWatch(cluster, "team-a") as seen:
        ...                                   # create, run, delete
    assert seen.finalizers() == {}            # {(kind, name): {finalizer, ...}}
"""

from __future__ import annotations

import json
import subprocess
import threading

from qlora_localcluster import build
from qlora_localcluster.cluster import LocalCluster


class FinalizerWatch:
    def __init__(self, cluster: LocalCluster, namespace: str, kinds: tuple[str, ...] = ("qlorajobs", "jobs", "pods")):
        self.cluster, self.namespace, self.kinds = cluster, namespace, kinds
        self._seen: dict[tuple[str, str], set[str]] = {}
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> FinalizerWatch:
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()

    def start(self) -> FinalizerWatch:
        kubectl = str(build.ensure_binaries(["kubectl"])["kubectl"])
        for kind in self.kinds:
            proc = subprocess.Popen([kubectl, "--kubeconfig", str(self.cluster.kubeconfig), "-n", self.namespace,
                                     "get", kind, "--watch", "-o", "json"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            thread = threading.Thread(target=self._read, args=(kind, proc), daemon=True)
            thread.start()
            self._procs.append(proc)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Idempotent: a test stops it to check, and again in its cleanup."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        for thread in self._threads:
            thread.join(5)

    def finalizers(self) -> dict[tuple[str, str], set[str]]:
        with self._lock:
            return {key: set(found) for key, found in self._seen.items() if found}

    def _read(self, kind: str, proc: subprocess.Popen) -> None:
        """The objects come one after another, each pretty-printed over several lines."""
        decoder, buffer = json.JSONDecoder(), ""
        for line in proc.stdout:
            buffer += line
            while buffer.strip():
                try:
                    obj, end = decoder.raw_decode(buffer.lstrip())
                except json.JSONDecodeError:
                    break  # not complete yet
                buffer = buffer.lstrip()[end:]
                meta = obj.get("metadata") or {}
                with self._lock:
                    self._seen.setdefault((kind, meta.get("name", "")), set()).update(meta.get("finalizers") or [])
