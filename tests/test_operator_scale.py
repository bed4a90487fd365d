"""The thousand-jobs benchmark's harness at 20 jobs, on a private cluster with the API server's
audit log on for the operator: no job lost, one trainer Job each (counted in the audit log, which
must then agree with the watch), and an idle operator whose requests do not grow with the jobs it
serves (the resync's few LISTs per interval, no request per job). About a minute on 2 cores.

    .venv/bin/python benchmarks/thousand_jobs.py     # the benchmark itself: 100 and 1,000 jobs
"""

import argparse
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import thousand_jobs  # noqa: E402

pytestmark = pytest.mark.cluster
JOBS = 20
SNAPSHOT_LISTS = 4  # QLoRAJobs, ConfigMaps, Jobs, pods: one LIST each per resync
# The window opens when the harness sees the last job terminal; under load the operator's reactions
# to the last status changes (each a reconcile: a GET of the QLoRAJob and a LIST of its Jobs) still
# land inside it: 22 requests against 20 once, 34 against 24 once (9 such reconciles), on 2 cores
# with 4 test workers. So the steady cost is held to the window's second half, where those have
# drained, and the whole window to at most one such reconcile per job on top of the resyncs.
EDGE_REQUESTS = 2 * 2
RECONCILE_REQUESTS = 2


def test_twenty_jobs_at_once_none_lost_and_an_idle_operator_costs_no_request_per_job(tmp_path):
    args = argparse.Namespace(gpus=8, nodes=1, steps=1, interval=2.0, threads=4, settle=8.0, timeout=180.0,
                              log_level="WARNING", workdir=None)
    run = thousand_jobs.run_one(JOBS, args, tmp_path)
    assert run["operator_alive"]
    assert (run["terminal"], run["succeeded_with_digest"], run["lost"]) == (JOBS, JOBS, 0), run
    assert run["trainer_jobs_per_qlorajob"] == [1] and run["jobs_seen"] == JOBS
    assert run["trainer_jobs_created"] == JOBS  # the audit log saw each of the operator's creates once
    # Idle: the resync's snapshot per interval and the window's edges; the per-job resync it
    # replaced made a GET and a LIST per job per interval (40 per interval here).
    intervals = math.ceil(run["settle_seconds"] / args.interval) + 1
    late_intervals = math.ceil(run["settle_seconds"] / 2 / args.interval) + 1
    assert run["requests_idle_second_half"] <= SNAPSHOT_LISTS * late_intervals + EDGE_REQUESTS, \
        run["requests_by_kind_idle_second_half"]
    assert run["requests_idle"] <= SNAPSHOT_LISTS * intervals + RECONCILE_REQUESTS * JOBS, run["requests_by_kind_idle"]
    assert run["requests_per_job_active"] < 60, run["requests_by_kind_active"]
