"""`qlora-trainer --config PATH [--termination-log PATH]`: run, report, exit with a meaningful code.

    qlora-trainer --config run.json                                  # one process, one GPU (or CPU)
    qlora-trainer --config run.json --nproc-per-node 8               # data parallel on 8 GPUs, via torchrun
    qlora-trainer --config run.json --nproc-per-node 8 --nnodes 2 \
        --master-addr job-0.job-ranks --master-port 29500            # node rank from JOB_COMPLETION_INDEX
"""

import argparse
import atexit
import logging
import os
import signal
import sys
import time
from pathlib import Path

from qlora_api import ExitCode
from qlora_api.protocol import CONFIG_PATH, TERMINATION_MESSAGE_PATH

from qlora_trainer.config import load_run_config
from qlora_trainer.errors import classify, interrupted
from qlora_trainer.interruption import Interruption
from qlora_trainer.launcher import RANK_DONE, rank_message_path
from qlora_trainer.phases import PhaseClock
from qlora_trainer.reporting import (
    ProgressReporter,
    claim_stdout,
    error_message,
    result_message,
    setup_logging,
    write_termination_message,
)

log = logging.getLogger("qlora_trainer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qlora-trainer", description=__doc__)
    parser.add_argument("--config", default=CONFIG_PATH, help="TrainerRunConfig JSON (default: %(default)s)")
    parser.add_argument("--termination-log", default=TERMINATION_MESSAGE_PATH,
                        help="where the result or error goes (default: %(default)s)")
    parser.add_argument("--workdir", default=None, help="local scratch folder (default: a new temporary folder)")
    group = parser.add_argument_group("data parallel (torchrun)")
    group.add_argument("--nproc-per-node", type=int, default=1, help="trainer processes on this node: one per GPU")
    group.add_argument("--nnodes", type=int, default=1, help="nodes (pods) in the group")
    group.add_argument("--node-rank", type=int, default=int(os.environ.get("JOB_COMPLETION_INDEX", "0")),
                       help="this node's rank (default: JOB_COMPLETION_INDEX, the Indexed Job's pod index)")
    group.add_argument("--master-addr", default=None, help="node 0's address, with --nnodes > 1")
    group.add_argument("--master-port", type=int, default=29500, help="node 0's rendezvous port")
    return parser.parse_args(argv)


def entrypoint() -> int:
    """The process's entry (`qlora-trainer`, `python -m qlora_trainer`): main(), then an exit that
    skips the interpreter's finalization. Tearing down torch, transformers and their objects module
    by module takes 1.6 s of an idle CPU and over 5 s of a loaded one (measured with a tiny model),
    after the result is published and the termination message written: the pod would stay Running
    that long for nothing, outside every phase the run reports. The atexit handlers registered
    after this one (torch's, the upload pools') still run, first; the one registered before it
    (logging's, when this module was imported) is called here; then the std streams are flushed
    and the process ends with main()'s code. main() itself stays a plain function for callers in
    the same process."""
    code = [int(ExitCode.UNEXPECTED)]  # an exception escaping main() (it catches all) ends as unexpected

    def end_without_finalization():
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed or a broken pipe: nothing left to save
                pass
        os._exit(code[0])

    atexit.register(end_without_finalization)  # registered first, so it runs last
    try:
        code[0] = main()
    except SystemExit as exc:  # argparse's --help (0) and usage errors (2) keep their codes
        code[0] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    return code[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    if args.nproc_per_node * args.nnodes > 1:
        return _launch_group(args)
    # Under torchrun each rank writes its own termination message; the launcher picks one.
    args.termination_log = rank_message_path(args.termination_log)
    reporter = ProgressReporter(claim_stdout())
    try:
        # The config is checked before torch is imported: a bad spec fails in a second.
        cfg = load_run_config(args.config)
        # Light (boto3, the data checks): torch and the training libraries import on a thread once
        # the run starts (sft.main). Here, not at the top: --help and the torchrun launcher need none
        # of it, and before the phase clock starts, which covers the run from here on.
        from qlora_trainer import sft

        # Under torchrun rank 0 alone prints phase lines (sft.main silences the others once it knows the world).
        phases = PhaseClock(reporter if os.environ.get("RANK", "0") == "0" else None)
        interruption = Interruption()
        _handle_sigterm(interruption)
        result = sft.main(cfg, reporter, interruption, Path(args.workdir) if args.workdir else None, phases)
        if result is None:  # a rank other than 0: rank 0 published and reports
            write_termination_message(args.termination_log, RANK_DONE)
            return int(ExitCode.OK)
    except BaseException as exc:
        failure = classify(exc) if not isinstance(exc, KeyboardInterrupt) else interrupted("interrupted (SIGINT)")
        if failure.exit_code == ExitCode.UNEXPECTED:
            log.exception("unexpected failure")
        else:
            log.error("%s: %s", failure.reason, failure.message)
        write_termination_message(args.termination_log, error_message(failure))
        return int(failure.exit_code)
    write_termination_message(args.termination_log, result_message(result))
    return int(ExitCode.OK)


def _launch_group(args: argparse.Namespace) -> int:
    from qlora_trainer.launcher import launch, torchrun_args

    worker = ["--config", args.config, "--termination-log", args.termination_log]
    if args.workdir:
        worker += ["--workdir", args.workdir]  # each rank works in its own rank-<N> folder under it
    return launch(torchrun_args(args.nproc_per_node, args.nnodes, args.node_rank, args.master_addr,
                                args.master_port, worker), args.termination_log)


def _handle_sigterm(interruption) -> None:
    """Kubernetes sends SIGTERM on preemption, suspend and deletion, then SIGKILL after the grace
    period: inside the training loop, finish the step and save a checkpoint; while publishing, finish
    the publication; elsewhere stop now.

    Publishing is let finish because stopping it costs more than it saves: an adapter's files take
    seconds to upload, well inside the grace period, and a trainer stopped between its publication
    claim and its manifest leaves a claim of its own attempt, which the replacement pod (same
    attempt) must treat as a live racer's and wait for (publishing.WINNER_WAIT_SECONDS)."""

    def on_sigterm(signum, frame):
        if interruption.training and not interruption.requested:
            log.warning("SIGTERM received: checkpointing at the end of this step")
            interruption.requested_at = time.monotonic()
            interruption.requested = True
            return
        if interruption.publishing and not interruption.requested:
            log.warning("SIGTERM received while publishing: finishing the publication within the grace period")
            interruption.requested_at = time.monotonic()
            interruption.requested = True
            return
        raise interrupted("stopped by SIGTERM outside the training loop (no checkpoint saved)")

    signal.signal(signal.SIGTERM, on_sigterm)


if __name__ == "__main__":
    sys.exit(entrypoint())
