"""`qlora-trainer --nproc-per-node N [--nnodes M ...]`: the same run as N x M processes, through torchrun.

torchrun (torch.distributed.run) starts one trainer process per GPU on this node, gives each its
RANK/LOCAL_RANK/WORLD_SIZE and the rendezvous, and stops them all when one fails. It is called here
in-process, with its own arguments, only so that its failure comes back as an exception whose
meaning we keep: torchrun itself exits 1 for any failure, and the operator acts on the trainer's
exit codes (retry, or not) and reads the reason from the termination message.

Each rank writes its termination message to a file of its own (QLORA_RANK_MESSAGES); when the
group ends, this node's message is rank 0's result, or the failure of the rank that failed first
(the others usually fail only because it did).

One node: torchrun's standalone rendezvous (a free local port). Several nodes (the operator's
Indexed Job): the static rendezvous at the master's address (index 0's stable name behind the
headless Service), this node's rank from JOB_COMPLETION_INDEX.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from qlora_api import ExitCode, TrainerError
from qlora_api.protocol import parse_termination_message

log = logging.getLogger("qlora_trainer")

RANK_MESSAGES_ENV = "QLORA_RANK_MESSAGES"
RANK_DONE = '{"event": "rank-done"}'  # what a rank other than 0 leaves when it finished its part


def rank_message_path(default: str, env=os.environ) -> str:
    """Where this process writes its termination message: its own file under torchrun."""
    folder = env.get(RANK_MESSAGES_ENV)
    if folder and "RANK" in env:
        return str(Path(folder) / f"rank-{env['RANK']}.json")
    return default


def torchrun_args(nproc_per_node: int, nnodes: int, node_rank: int, master_addr: str | None,
                  master_port: int, worker_argv: list[str]) -> list[str]:
    """torchrun's command line for this node (no restarts: a failed group fails the pod, and the
    operator's next attempt resumes the whole group from the newest checkpoint)."""
    args = [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", "--max-restarts=0"]
    if nnodes == 1:
        args.append("--standalone")
    else:
        if not master_addr:
            raise ValueError("--master-addr is needed with --nnodes > 1")
        args += ["--rdzv-backend=static", f"--node-rank={node_rank}", f"--master-addr={master_addr}",
                 f"--master-port={master_port}"]
    return [*args, "-m", "qlora_trainer", *worker_argv]


def launch(torchrun_argv: list[str], termination_log: str) -> int:
    """Run the group; write this node's termination message; return the exit code that explains it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from qlora_trainer.reporting import write_termination_message

    messages = Path(tempfile.mkdtemp(prefix="qlora-ranks-"))
    os.environ[RANK_MESSAGES_ENV] = str(messages)
    log.info("torchrun %s", " ".join(torchrun_argv))
    failures: dict[int, int] = {}
    try:
        run(get_args_parser().parse_args(torchrun_argv))
    except ChildFailedError as exc:
        failures = {rank: failure.exitcode for rank, failure in exc.failures.items()}
    except SignalException as exc:  # SIGTERM to the pod: the workers checkpoint and say so themselves
        log.warning("torchrun stopped by %s", exc.sigval.name)
        failures = {-1: -int(exc.sigval)}
    text, code = node_outcome(messages, failures)
    if text is not None:
        write_termination_message(termination_log, text)
    else:
        log.info("this node holds no rank 0: its result is on the first node")
    return code


def node_outcome(messages: Path, failures: dict[int, int]) -> tuple[str | None, int]:
    """The termination message and exit code of this node, from its ranks' messages and failures."""
    written = sorted(messages.glob("rank-*.json"), key=lambda p: p.stat().st_mtime_ns)
    parsed = {int(p.stem.removeprefix("rank-")): (p.read_text(), parse_termination_message(p.read_text()))
              for p in written}
    errors = [(rank, text, msg) for rank, (text, msg) in parsed.items() if isinstance(msg, TrainerError)]
    if not failures and not errors:
        return (parsed[0][0], int(ExitCode.OK)) if 0 in parsed else (None, int(ExitCode.OK))
    silent = sorted(r for r in failures if r >= 0 and r not in parsed)
    died = "; ".join(f"rank {r} died without a message (exit {failures[r]})" for r in silent)
    if errors:
        rank, _, first = errors[0]  # written first: the cause; later ones followed from it
        message = f"rank {rank}: {first.message}" + (f" ({died})" if died else "")
        return _error(first.reason, message, first.exit_code), first.exit_code
    message = died or f"the group stopped (exit codes {json.dumps(failures)})"
    return _error("WorkerLost", message, int(ExitCode.UNEXPECTED)), int(ExitCode.UNEXPECTED)


def _error(reason: str, message: str, exit_code: int) -> str:
    from qlora_trainer.errors import TrainerFailure
    from qlora_trainer.reporting import error_message

    return error_message(TrainerFailure(ExitCode(exit_code), reason, message))
