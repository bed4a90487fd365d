"""A thousand QLoRAJobs at once: what the operator costs, and whether it loses any.

For each count N (default 100, then 1000), on a PRIVATE local cluster of its own (real etcd, API
server, controllers, scheduler, node agents; never the shared one) with the API server's audit log
on for the operator's ServiceAccount only:

1. the chart's CRD and RBAC, and the operator as a subprocess authenticated as that ServiceAccount
   (its production defaults: resync every 5 s, log tails of 50 lines);
2. N QLoRAJobs created at once (a pool of client threads) for the scripted trainer
   (tests/support/fake_trainer.py: real protocol, progress lines, a termination message with a
   manifest digest), while a watch on batch/v1 Jobs timestamps each trainer Job as it appears;
3. wait until every QLoRAJob is terminal, then keep the operator running for a settle period with
   nothing left to do (memory flat? requests per idle job?).

It reports creation-to-Job latency (client clock: from the moment the create request was sent, and
from the moment it returned, to the watch event of the Job, since the API's timestamps are whole
seconds), the operator's peak RSS and CPU seconds (from /proc), its API requests (counted in the
audit log: per job over the run and per job per minute, active and idle), its RSS once the jobs have
finished, and that none was lost (every QLoRAJob terminal, Succeeded with a manifest digest, one Job each).

GPUs bound how many trainers run at once (--gpus, spread over --nodes node agents): the trainer Jobs
are all created at once, the pods beyond the GPUs wait Unschedulable, as on a real platform.

    .venv/bin/python benchmarks/thousand_jobs.py                       # N=100 and N=1000, tables + JSON
    .venv/bin/python benchmarks/thousand_jobs.py --counts 20 --settle 20 --out /tmp/bench   # a rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in ("operator", "localcluster"):
    sys.path.insert(0, str(REPO / folder))

from kubernetes import client, config, watch  # noqa: E402
from qlora_localcluster import operator_install  # noqa: E402
from qlora_localcluster.testing import free_ports, private_cluster  # noqa: E402

NAMESPACE = "bench"
OPERATOR_USER = f"system:serviceaccount:{operator_install.NAMESPACE}:{operator_install.SERVICE_ACCOUNT}"
JOB_LABEL = "training.qlora-operator.dev/qlorajob"
GROUP, VERSION, PLURAL = "training.qlora-operator.dev", "v1alpha1", "qlorajobs"
TERMINAL = ("Succeeded", "Failed")


def qlorajob(name: str, steps: int) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "QLoRAJob",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"model": {"uri": "hf://fake/succeed"}, "dataset": {"uri": "s3://datasets/chat/train.jsonl"},
                     "output": {"bucket": "adapters"}, "training": {"maxSteps": steps},
                     "resources": {"image": "qlora-fake-trainer:bench"}}}


# --- the operator process and what /proc says about it ---------------------------------------------
class OperatorUnderTest:
    def __init__(self, kubeconfig: Path, log_path: Path, interval: float, log_level: str = "WARNING"):
        self.metrics_port, self.health_port = free_ports(2)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("QLORA_", "KUBERNETES_"))}
        env.update({"KUBECONFIG": str(kubeconfig), "QLORA_RECONCILE_INTERVAL_SECONDS": str(interval),
                    "QLORA_METRICS_PORT": str(self.metrics_port), "QLORA_HEALTH_PORT": str(self.health_port),
                    "QLORA_LOG_LEVEL": log_level,
                    "PYTHONPATH": os.pathsep.join(str(REPO / f) for f in ("operator", "trainer_image"))})
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "qlora_operator", "--namespace", NAMESPACE],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.samples: list[tuple[float, int, float]] = []  # (monotonic, RSS bytes, CPU seconds)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2):
                    self._sampler.start()
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("the operator's /healthz did not answer")

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self._stop.is_set() and self.proc.poll() is None:
            try:
                rss = next(int(line.split()[1]) * 1024 for line in
                           Path(f"/proc/{self.proc.pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
                fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            except (OSError, StopIteration, IndexError, ValueError):
                break
            self.samples.append((time.monotonic(), rss, cpu))
            self._stop.wait(0.5)

    def peak_rss(self) -> int:
        hwm = [line for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
               if line.startswith("VmHWM:")]
        return int(hwm[0].split()[1]) * 1024

    def at(self, moment: float) -> tuple[int, float]:
        """(RSS, CPU seconds) of the last sample at or before `moment`."""
        before = [s for s in self.samples if s[0] <= moment] or self.samples[:1]
        return before[-1][1], before[-1][2]

    def stop(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --- the client side: creates, a watch on Jobs, the final census ----------------------------------
class JobWatch:
    """The first time each trainer Job is seen (monotonic), keyed by its QLoRAJob's name."""

    def __init__(self, batch: client.BatchV1Api):
        self.batch, self.seen, self.jobs_per_owner = batch, {}, Counter()
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        version = self.batch.list_namespaced_job(NAMESPACE).metadata.resource_version
        self.ready.set()
        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(self.batch.list_namespaced_job, NAMESPACE, resource_version=version,
                                                  timeout_seconds=60, allow_watch_bookmarks=True):
                    now = time.monotonic()
                    obj = event["object"]
                    if event["type"] == "BOOKMARK":
                        version = obj["metadata"]["resourceVersion"]
                        continue
                    version = obj.metadata.resource_version
                    owner = (obj.metadata.labels or {}).get(JOB_LABEL)
                    if event["type"] == "ADDED" and owner and obj.metadata.name not in self.seen:
                        self.seen[obj.metadata.name] = now
                        self.jobs_per_owner[owner] += 1
                    if self._stop.is_set():
                        return
            except Exception as e:  # noqa: BLE001 - 410 Gone, a timeout: list again and go on
                print(f"  the watch on Jobs broke ({getattr(e, 'status', e)}); listing again", flush=True)
                version = self._relist(version)

    def _relist(self, version: str) -> str:
        """Jobs created while the watch was down are recorded now (a little late, so their latency
        is overstated, never understated)."""
        for _ in range(10):
            try:
                listing = self.batch.list_namespaced_job(NAMESPACE, _request_timeout=120)
            except Exception:  # noqa: BLE001
                time.sleep(5)
                continue
            now = time.monotonic()
            for job in listing.items:
                owner = (job.metadata.labels or {}).get(JOB_LABEL)
                if owner and job.metadata.name not in self.seen:
                    self.seen[job.metadata.name] = now
                    self.jobs_per_owner[owner] += 1
            return listing.metadata.resource_version
        return version

    def first_job_of(self, owner: str) -> float | None:
        return self.seen.get(f"{owner}-1")

    def stop(self) -> None:
        self._stop.set()


def create_all(custom: client.CustomObjectsApi, names: list[str], steps: int, threads: int) -> dict:
    sent, returned, wall = {}, {}, {}

    def create(name: str) -> None:
        wall[name] = time.time()
        sent[name] = time.monotonic()  # the first try's: a retry's wait counts against the operator
        for attempt in range(5):
            try:
                custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, qlorajob(name, steps),
                                                       _request_timeout=120)
                break
            except client.ApiException as e:
                if e.status == 409:  # an earlier try that timed out had created it
                    break
                if e.status < 500 and e.status != 429 or attempt == 4:
                    raise
                time.sleep(2)
        returned[name] = time.monotonic()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(create, names))
    return {"sent": sent, "returned": returned, "wall": wall}


def census(custom: client.CustomObjectsApi, tries: int = 10) -> dict[str, dict]:
    """Every QLoRAJob's status, from the watch cache (resourceVersion 0: no etcd read, which a
    starved API server timed out on at 1,000 objects); retried, since the benchmark must outlast a
    slow answer."""
    for attempt in range(tries):
        try:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL,
                                                         resource_version="0", _request_timeout=120)["items"]
            return {i["metadata"]["name"]: i.get("status") or {} for i in items}
        except (client.ApiException, OSError) as e:
            if attempt == tries - 1:
                raise
            print(f"  census failed ({getattr(e, 'status', e)}); again in 5 s", flush=True)
            time.sleep(5)
    raise AssertionError("unreachable")


# --- the audit log ---------------------------------------------------------------------------------
def audit_requests(path: Path) -> list[dict]:
    """One entry per request of the operator's user (a watch logs ResponseStarted and ResponseComplete
    under one auditID: counted once), with its wall-clock time and what it was."""
    requests: dict[str, dict] = {}
    with open(path) as lines:
        for line in lines:
            event = json.loads(line)
            if event.get("user", {}).get("username") != OPERATOR_USER:
                continue
            ref = event.get("objectRef") or {}
            requests.setdefault(event["auditID"], {
                "time": event["requestReceivedTimestamp"], "verb": event["verb"],
                "resource": ref.get("resource", "") + ("/" + ref["subresource"] if ref.get("subresource") else ""),
                "name": ref.get("name"), "code": (event.get("responseStatus") or {}).get("code"),
                "seconds": epoch(event["stageTimestamp"]) - epoch(event["requestReceivedTimestamp"])})
    return list(requests.values())


def epoch(stamp: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# --- one run ---------------------------------------------------------------------------------------
def run_one(n: int, args, workdir: Path) -> dict:
    state = workdir / f"cluster-{n}"
    nodes = max(1, min(args.nodes, args.gpus))
    gpus_per_node = -(-args.gpus // nodes)
    settings = {"gpu_nodes": nodes, "gpus_per_node": gpus_per_node, "max_pods_per_node": n + 20,
                "audit_users": [OPERATOR_USER]}
    print(f"--- N={n}: private cluster in {state} ({nodes} node(s) x {gpus_per_node} GPUs)", flush=True)
    with private_cluster(state, **settings) as cluster:
        operator_install.apply_chart(cluster)
        cluster.kubectl("create", "namespace", NAMESPACE)
        kubeconfig = operator_install.service_account_kubeconfig(cluster, workdir / f"operator-{n}.kubeconfig")
        api = config.new_client_from_config(str(cluster.kubeconfig))
        api.configuration.connection_pool_maxsize = args.threads + 4
        custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)
        operator = OperatorUnderTest(kubeconfig, workdir / f"operator-{n}.log", args.interval, args.log_level)
        try:
            operator.wait_healthy()
            time.sleep(2)  # its watches are up: the first creates are not the start-up's
            jobs = JobWatch(batch)
            jobs.ready.wait(30)
            names = [f"bench-{i:04d}" for i in range(n)]
            wall_start, start = time.time(), time.monotonic()
            times = create_all(custom, names, args.steps, args.threads)
            created = time.monotonic()
            print(f"created {n} QLoRAJobs in {created - start:.1f} s", flush=True)
            deadline = start + args.timeout
            while True:
                status = census(custom)
                done = sum(s.get("phase") in TERMINAL for s in status.values())
                if done == n or time.monotonic() > deadline:
                    break
                print(f"  {time.monotonic() - start:5.0f} s: {done}/{n} terminal, {len(jobs.seen)} Jobs, "
                      f"operator RSS {operator.samples[-1][1] / 2**20:.0f} MiB", flush=True)
                time.sleep(5)
            finished, wall_finished = time.monotonic(), time.time()
            print(f"{done}/{n} terminal after {finished - start:.0f} s; settling {args.settle:.0f} s", flush=True)
            time.sleep(args.settle)
            settled, wall_settled = time.monotonic(), time.time()
            final = census(custom)
            peak = operator.peak_rss()
            alive = operator.proc.poll() is None
        finally:
            operator.stop()
            jobs.stop() if "jobs" in locals() else None
        requests = audit_requests(cluster.audit_log_path)
    if args.workdir:  # for a closer look: each job's create (wall clock) and when its Job was seen
        (workdir / f"trace-{n}.json").write_text(json.dumps({
            "created_wall": times["wall"], "job_seen_after_sent": {
                k: jobs.first_job_of(k) - t for k, t in times["sent"].items() if jobs.first_job_of(k)}}))
    return summarize(n, args, times, jobs, final, operator, requests, peak, alive,
                     (start, created, finished, settled), (wall_start, wall_finished, wall_settled))


def summarize(n, args, times, jobs, final, operator, requests, peak, alive, clock, wall) -> dict:
    start, created, finished, settled = clock
    wall_start, wall_finished, wall_settled = wall
    from_sent = [jobs.first_job_of(k) - t for k, t in times["sent"].items() if jobs.first_job_of(k)]
    from_returned = [jobs.first_job_of(k) - t for k, t in times["returned"].items() if jobs.first_job_of(k)]
    succeeded = [k for k, s in final.items() if s.get("phase") == "Succeeded" and (s.get("result") or {}).get(
        "manifestSha256")]
    terminal = [k for k, s in final.items() if s.get("phase") in TERMINAL]
    stamps = [(epoch(r["time"]), r) for r in requests]
    active = [r for t, r in stamps if wall_start <= t < wall_finished]
    idle = [r for t, r in stamps if wall_finished <= t < wall_settled]
    # the idle window's second half: the operator's reactions to the last status changes (a
    # reconcile each) have drained by then even on a loaded machine, what is left is its steady cost
    late_from = wall_finished + (wall_settled - wall_finished) / 2
    idle_late = [r for t, r in stamps if late_from <= t < wall_settled]
    active_min, idle_min = (wall_finished - wall_start) / 60, (wall_settled - wall_finished) / 60
    rss_done, cpu_done = operator.at(finished)
    rss_end, cpu_end = operator.at(settled)
    _, cpu_start = operator.at(start)
    kinds = Counter(f"{r['verb']} {r['resource']}" for r in active)
    idle_kinds = Counter(f"{r['verb']} {r['resource']}" for r in idle)
    # How busy the API server was: its time per request of the operator (watches left out).
    api_seconds = [r["seconds"] for r in active if r["verb"] != "watch"]
    return {
        "jobs": n, "gpus": args.gpus, "trainer_steps": args.steps, "resync_interval_s": args.interval,
        "create_seconds": round(created - start, 2),
        "all_terminal_seconds": round(finished - start, 1),
        "jobs_seen": len(from_sent),
        "latency_from_sent_s": {"p50": round(percentile(from_sent, 50), 3), "p99": round(percentile(from_sent, 99), 3),
                                "max": round(max(from_sent), 3)} if from_sent else None,
        "latency_from_returned_s": {"p50": round(percentile(from_returned, 50), 3),
                                    "p99": round(percentile(from_returned, 99), 3)} if from_returned else None,
        "terminal": len(terminal), "succeeded_with_digest": len(succeeded), "lost": n - len(terminal),
        "trainer_jobs_per_qlorajob": sorted(set(jobs.jobs_per_owner.values())),
        "operator_alive": alive,
        "operator_peak_rss_mib": round(peak / 2**20, 1),
        "operator_rss_at_all_terminal_mib": round(rss_done / 2**20, 1),
        "operator_rss_after_settle_mib": round(rss_end / 2**20, 1),
        "operator_cpu_s_active": round(cpu_done - cpu_start, 1),
        "operator_cpu_s_idle": round(cpu_end - cpu_done, 1),
        "settle_seconds": round(settled - finished, 1),
        "requests_total": len(requests),
        "requests_active": len(active), "requests_idle": len(idle),
        "requests_idle_second_half": len(idle_late),
        "requests_by_kind_idle_second_half": dict(Counter(f"{r['verb']} {r['resource']}" for r in idle_late)),
        "requests_per_job_active": round(len(active) / n, 2),
        "requests_per_job_per_min_active": round(len(active) / n / active_min, 2),
        "requests_per_job_per_min_idle": round(len(idle) / n / idle_min, 2) if idle_min else None,
        "requests_by_kind_active": dict(kinds.most_common()),
        "requests_by_kind_idle": dict(idle_kinds.most_common()),
        "trainer_jobs_created": sum(1 for r in requests if (r["verb"], r["resource"], r["code"]) == ("create", "jobs", 201)),
        "api_latency_of_operator_requests_s": {"p50": round(percentile(api_seconds, 50), 3),
                                               "p99": round(percentile(api_seconds, 99), 3)} if api_seconds else None,
        "errors_5xx_or_429": sum(1 for r in requests if (r["code"] or 0) in (429,) or (r["code"] or 0) >= 500),
    }


def table(results: list[dict], conditions: str) -> str:
    rows = [
        ("QLoRAJobs created at once", "jobs", "{}"),
        ("time to create them (client, s)", "create_seconds", "{}"),
        ("creation→Job p50 / p99 (from request sent, s)", "latency_from_sent_s",
         lambda v: f"{v['p50']:.2f} / {v['p99']:.2f}" if v else "-"),
        ("creation→Job p50 / p99 (from create returned, s)", "latency_from_returned_s",
         lambda v: f"{v['p50']:.2f} / {v['p99']:.2f}" if v else "-"),
        ("all terminal after (s)", "all_terminal_seconds", "{}"),
        ("terminal / Succeeded with digest / lost", None,
         lambda r: f"{r['terminal']} / {r['succeeded_with_digest']} / {r['lost']}"),
        ("trainer Jobs per QLoRAJob", "trainer_jobs_per_qlorajob", "{}"),
        ("operator peak RSS (MiB)", "operator_peak_rss_mib", "{}"),
        ("operator RSS when all terminal → after settle (MiB)", None,
         lambda r: f"{r['operator_rss_at_all_terminal_mib']} → {r['operator_rss_after_settle_mib']}"
                   f" ({r['settle_seconds']:.0f} s)"),
        ("operator CPU s (active / idle settle)", None,
         lambda r: f"{r['operator_cpu_s_active']} / {r['operator_cpu_s_idle']}"),
        ("API requests of the operator (active run)", "requests_active", "{}"),
        ("requests per job (active run)", "requests_per_job_active", "{}"),
        ("requests per job per minute (active / idle)", None,
         lambda r: f"{r['requests_per_job_per_min_active']} / {r['requests_per_job_per_min_idle']}"),
        ("requests while idle, by kind", "requests_by_kind_idle",
         lambda v: ", ".join(f"{k} {c}" for k, c in v.items()) or "none"),
        ("API server time per operator request p50 / p99 (s)", "api_latency_of_operator_requests_s",
         lambda v: f"{v['p50']:.3f} / {v['p99']:.3f}" if v else "-"),
        ("429 or 5xx answers", "errors_5xx_or_429", "{}"),
    ]
    out = ["| | " + " | ".join(f"N={r['jobs']}" for r in results) + " |",
           "|---|" + "---|" * len(results)]
    for label, key, fmt in rows:
        cells = []
        for r in results:
            if key is None:
                cells.append(fmt(r))
            elif callable(fmt):
                cells.append(fmt(r[key]))
            else:
                cells.append(fmt.format(r[key]))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return f"{conditions}\n\n" + "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="100,1000", help="comma-separated job counts, one cluster each")
    parser.add_argument("--gpus", type=int, default=16, help="GPUs in all: how many trainers run at once")
    parser.add_argument("--nodes", type=int, default=2, help="node agents (at most 8)")
    parser.add_argument("--steps", type=int, default=2, help="training steps of the scripted trainer (0.2 s each)")
    parser.add_argument("--interval", type=float, default=5.0, help="the operator's resync interval (its default)")
    parser.add_argument("--threads", type=int, default=8, help="client threads creating QLoRAJobs")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds to watch the idle operator afterwards")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for all jobs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", default="thousand_jobs_cpu")
    parser.add_argument("--log-level", default="WARNING", help="the operator's (its log is kept with --workdir)")
    parser.add_argument("--workdir", type=Path, help="keep clusters, logs and the audit log here (default: a temporary folder)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="qlora-thousand-") as tmp:
        for n in counts:
            results.append(run_one(n, args, args.workdir or Path(tmp)))
            print(json.dumps(results[-1], indent=1), flush=True)
    conditions = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores shared with "
                  f"other work (load average when the table was written: {os.getloadavg()[0]:.1f}); {args.gpus} fake GPUs on "
                  f"{args.nodes} node agent(s); scripted trainer, {args.steps} steps of 0.2 s; "
                  f"operator resync every {args.interval:.0f} s; {args.threads} client threads")
    text = table(results, conditions)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"conditions": conditions, "runs": results}, indent=1))
    (args.out / f"{args.name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
