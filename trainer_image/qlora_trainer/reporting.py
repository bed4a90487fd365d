"""What the operator reads: one progress JSON object per stdout line, and the termination message.

The pod holds no Kubernetes credentials, so these two channels are the whole report: the operator
reads progress lines through pods/log and the result (or error) from the container's termination
message, which the kubelet keeps up to 4096 bytes of.
"""

import logging
import os
import sys
from typing import TextIO

from qlora_api import TrainerError, TrainerProgressLine, TrainerResultMessage, TrainingResult
from qlora_api.protocol import TERMINATION_MESSAGE_LIMIT

from qlora_trainer.errors import TrainerFailure

log = logging.getLogger("qlora_trainer")


def claim_stdout() -> TextIO:
    """A private handle on the real stdout for progress lines; fd 1 then points at stderr.

    Libraries print to stdout (Trainer's PrinterCallback, peft's parameter counts, warnings), and
    one stray line would make the operator's parser skip or misread a report. Taking stdout for
    ourselves keeps it to exactly one JSON object per line.
    """
    sys.stdout.flush()
    progress = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return progress


def setup_logging() -> None:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def summary(step: int, total: int | None) -> str:
    if not total:
        return str(step)
    return f"{step}/{total} ({100 * step // total}%)"


class ProgressReporter:
    def __init__(self, stream: TextIO):
        self.stream = stream

    def report(self, line: TrainerProgressLine) -> None:
        self.stream.write(line.model_dump_json(by_alias=True, exclude_none=True) + "\n")
        self.stream.flush()


def result_message(result: TrainingResult) -> str:
    """The result as JSON under the kubelet's limit: the file list goes first, then other details."""
    message = TrainerResultMessage(result=result)
    text = message.model_dump_json(by_alias=True, exclude_none=True)
    if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
        return text
    # The manifest (its URI and sha256 stay) lists every file, so the list is the cheapest to drop.
    trimmed = result.model_copy(update={"files": []})
    text = TrainerResultMessage(result=trimmed).model_dump_json(by_alias=True, exclude_none=True)
    if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
        return text
    # What a server needs stays too (the base, the adapter's rank and modules, the merged model's manifest).
    essentials = {"adapter_uri", "manifest_uri", "manifest_sha256", "eval_loss_before", "eval_loss_after",
                  "resumed_from_step", "base_model", "base_model_revision", "lora_rank", "lora_alpha",
                  "target_modules", "merged_model_uri", "merged_model_manifest_uri", "merged_model_manifest_sha256"}
    trimmed = TrainingResult(**{k: v for k, v in trimmed.model_dump().items() if k in essentials})
    return TrainerResultMessage(result=trimmed).model_dump_json(by_alias=True, exclude_none=True)


def error_message(failure: TrainerFailure) -> str:
    def render(text: str) -> str:
        return TrainerError(reason=failure.reason, message=text, exit_code=int(failure.exit_code)).model_dump_json(
            by_alias=True, exclude_none=True
        )

    text = render(failure.message)
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
        overhead = len(render("").encode())
        # Encoded JSON can grow (escapes); cut with margin and keep whole characters.
        budget = (TERMINATION_MESSAGE_LIMIT - overhead) // 2
        text = render(failure.message[:budget] + "...")
    return text


def write_termination_message(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        # Outside a pod there may be no /dev/termination-log; the message is on stderr as well.
        log.warning("could not write the termination message to %s: %s", path, exc)
    log.info("termination message: %s", text)
