"""Failures the operator can act on: each carries the exit code and CamelCase reason of the protocol.

Anything raised as a TrainerFailure ends the run with its own one-line message; everything else
is classified by `classify()` (CUDA out of memory, S3 errors, peft's target-module refusal) or
reported as Unexpected. The exit code decides whether the operator retries (ExitCode.retryable):
only what can go differently next time is retryable (S3 unreachable, 5xx, throttling, SIGTERM,
an unclassified error); a spec, a model or data that fails once fails the same way again.
"""

import re

from qlora_api import ExitCode


class TrainerFailure(Exception):
    def __init__(self, exit_code: ExitCode, reason: str, message: str):
        super().__init__(message)
        self.exit_code = ExitCode(exit_code)
        self.reason = reason
        self.message = " ".join(str(message).split())  # one line, whatever the cause printed


def invalid_config(message: str, reason: str = "InvalidConfig") -> TrainerFailure:
    return TrainerFailure(ExitCode.INVALID_CONFIG, reason, message)


def bad_data(message: str) -> TrainerFailure:
    return TrainerFailure(ExitCode.BAD_DATA, "BadData", message)


def model_not_found(message: str, reason: str = "ModelNotFound") -> TrainerFailure:
    return TrainerFailure(ExitCode.MODEL_NOT_FOUND, reason, message)


def storage_unavailable(message: str, reason: str = "StorageUnavailable") -> TrainerFailure:
    """Transient: the next attempt (or botocore's own retries) may find the store back."""
    return TrainerFailure(ExitCode.STORAGE_UNAVAILABLE, reason, message)


def storage_refused(message: str, reason: str) -> TrainerFailure:
    """Permanent: credentials, a policy, a missing bucket or object do not fix themselves."""
    return TrainerFailure(ExitCode.STORAGE_REFUSED, reason, message)


def interrupted(message: str) -> TrainerFailure:
    return TrainerFailure(ExitCode.INTERRUPTED, "Interrupted", message)


OOM_HINT = (
    "lower training.batchSize or training.maxSeqLength, raise gradientAccumulationSteps to keep the "
    "effective batch, or enable training.gradientCheckpointing"
)

# -- S3 error codes -----------------------------------------------------------------------------------
# What an S3 error means for a retry, by its code first (S3, MinIO, Ceph and R2 share these) and its
# HTTP status second. 403 is not always a refusal: a skewed clock or an expired session token is
# answered with 403 too, and a new pod (on another node, with fresh credentials) can succeed.
S3_TRANSIENT_CODES = {
    "500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "RequestTimeout", "RequestTimeTooSkewed",
    "ExpiredToken", "OperationAborted", "XMinioServerNotInitialized", "XMinioStorageFull",
}
S3_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken",
                   "AllAccessDisabled", "AccountProblem", "InvalidSecurity"}
S3_NO_BUCKET_CODES = {"NoSuchBucket"}
S3_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
S3_ACCESS_HINT = ("check the access key in the Secret named by spec.output.credentialsSecretRef and that the "
                  "store's policy lets it list, read and write these buckets")


def s3_error_kind(code: str, http_status: int | None) -> str:
    """`transient`, `access-denied`, `no-bucket`, `not-found` or `refused` (another 4xx: permanent)."""
    if code in S3_TRANSIENT_CODES or (http_status is not None and (http_status >= 500 or http_status in (408, 429))):
        return "transient"
    if code in S3_ACCESS_CODES or http_status == 403:
        return "access-denied"
    if code in S3_NO_BUCKET_CODES:
        return "no-bucket"
    if code in S3_NOT_FOUND_CODES or http_status == 404:
        return "not-found"
    if http_status is not None and 400 <= http_status < 500:
        return "refused"
    return "transient"  # no status to judge by: a retry costs less than a wrongly failed job


def client_error_parts(exc) -> tuple[str, int | None, str]:
    """(code, HTTP status, message) of a botocore ClientError."""
    response = getattr(exc, "response", None) or {}
    error = response.get("Error", {}) or {}
    status = (response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
    return str(error.get("Code", "Unknown")), status, str(error.get("Message", "") or "")


def s3_failure(code: str, http_status: int | None, endpoint: str, action: str, uri, detail: str = "") -> TrainerFailure:
    """The failure an S3 error stands for, with a message that says what to fix."""
    kind = s3_error_kind(code, http_status)
    said = f" ({code}{': ' + detail if detail else ''})"
    if kind == "access-denied":
        return storage_refused(f"S3 at {endpoint} denied {action} of {uri}{said}: {S3_ACCESS_HINT}",
                               "StorageAccessDenied")
    if kind == "no-bucket":
        return storage_refused(f"S3 at {endpoint}: the bucket of {uri} does not exist{said}: create it, or fix "
                               "the bucket in spec.output.bucket, spec.model.uri or spec.dataset.uri",
                               "StorageBucketNotFound")
    if kind == "not-found":
        return storage_refused(f"S3 at {endpoint}: {uri} not found{said}", "StorageObjectNotFound")
    if kind == "refused":
        return storage_refused(f"S3 at {endpoint} refused to {action} {uri}{said}: the request is not valid for "
                               "this store (check spec.output.endpointUrl, region and addressingStyle)",
                               "StorageRequestRefused")
    return storage_unavailable(f"S3 at {endpoint} failed to {action} {uri}{said}, a transient error; "
                               "retried with backoff")


# peft: "Target modules {'foo'} not found in the base model. Please check the target modules and try again."
_PEFT_TARGETS = re.compile(r"Target modules? .* not found in the base model", re.DOTALL)


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
    if isinstance(exc, ValueError) and _PEFT_TARGETS.search(str(exc)):
        # The check before loading (model_checks.py) normally says this first, with the names the
        # model has; this is the same refusal from peft itself, where that check could not run.
        return invalid_config(f"spec.lora.targetModules: {str(exc)[:500]}", "UnknownTargetModule")
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
        code, status, detail = client_error_parts(exc)
        return s3_failure(code, status, "S3", "complete a request", "(a request made by a library)", detail)
    if isinstance(exc, BotoCoreError):
        return storage_unavailable(f"S3 unreachable: {exc}")
    return None
