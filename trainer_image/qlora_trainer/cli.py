"""`qlora-trainer --config PATH [--termination-log PATH]`: run, report, exit with a meaningful code."""

import argparse
import logging
import signal
import sys

from qlora_api import ExitCode
from qlora_api.protocol import CONFIG_PATH, TERMINATION_MESSAGE_PATH

from qlora_trainer.config import load_run_config
from qlora_trainer.errors import classify, interrupted
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    reporter = ProgressReporter(claim_stdout())
    try:
        # The config is checked before torch is imported: a bad spec fails in a second.
        cfg = load_run_config(args.config)
        from pathlib import Path

        from qlora_trainer import sft
        from qlora_trainer.training_loop import Interruption

        interruption = Interruption()
        _handle_sigterm(interruption)
        result = sft.main(cfg, reporter, interruption, Path(args.workdir) if args.workdir else None)
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


def _handle_sigterm(interruption) -> None:
    """Kubernetes sends SIGTERM on preemption, suspend and deletion, then SIGKILL after the grace
    period: inside the training loop, finish the step and save a checkpoint; elsewhere stop now."""

    def on_sigterm(signum, frame):
        if interruption.training and not interruption.requested:
            log.warning("SIGTERM received: checkpointing at the end of this step")
            interruption.requested = True
            return
        raise interrupted("stopped by SIGTERM outside the training loop (no checkpoint saved)")

    signal.signal(signal.SIGTERM, on_sigterm)


if __name__ == "__main__":
    sys.exit(main())
