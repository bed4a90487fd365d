"""Failures the operator can act on: each carries the exit code and CamelCase reason of the protocol.

Anything raised as a TrainerFailure ends the run with its own one-line message; everything else
is classified by `classify()` (CUDA out of memory, S3 errors) or reported as Unexpected.
"""

from qlora_api import ExitCode


class TrainerFailure(Exception):
    def __init__(self, exit_code: ExitCode, reason: str, message: str):
        super().__init__(message)
        self.exit_code = ExitCode(exit_code)
        self.reason = reason
        self.message = " ".join(str(message).split())  # one line, whatever the cause printed


def invalid_config(message: str) -> TrainerFailure:
    return TrainerFailure(ExitCode.INVALID_CONFIG, "InvalidConfig", message)


def bad_data(message: str) -> TrainerFailure:
    return TrainerFailure(ExitCode.BAD_DATA, "BadData", message)


def model_not_found(message: str) -> TrainerFailure:
    return TrainerFailure(ExitCode.MODEL_NOT_FOUND, "ModelNotFound", message)


def storage_unavailable(message: str, reason: str = "StorageUnavailable") -> TrainerFailure:
    return TrainerFailure(ExitCode.STORAGE_UNAVAILABLE, reason, message)


def interrupted(message: str) -> TrainerFailure:
    return TrainerFailure(ExitCode.INTERRUPTED, "Interrupted", message)


OOM_HINT = (
    "lower training.batchSize or training.maxSeqLength, raise gradientAccumulationSteps to keep the "
    "effective batch, or enable training.gradientCheckpointing"
)


def classify(exc: BaseException) -> TrainerFailure:
    """The failure an exception that escaped the run stands for."""
    if isinstance(exc, TrainerFailure):
        return exc
    if _is_cuda_oom(exc):
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "CUDA out of memory"
        return TrainerFailure(ExitCode.OUT_OF_MEMORY, "CudaOutOfMemory", f"{first_line[:300]}. Hint: {OOM_HINT}")
    storage = _storage_failure(exc)
    if storage is not None:
        return storage
    return TrainerFailure(ExitCode.UNEXPECTED, "Unexpected", f"{type(exc).__name__}: {str(exc)[:500]}")


def _is_cuda_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # the config checks run before torch is imported
        pass
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def _storage_failure(exc: BaseException) -> TrainerFailure | None:
    """botocore errors that escaped storage.py's own handling (e.g. inside a library callback)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return None
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "Unknown")
        return storage_unavailable(f"S3 refused a request ({code}): {exc}", "StorageAccessDenied")
    if isinstance(exc, BotoCoreError):
        return storage_unavailable(f"S3 unreachable: {exc}")
    return None
