"""What to do about a failure, by its reason: the last line `qlora watch` and `describe` print.

The trainer's own messages sometimes carry their hint ("... Hint: lower batchSize"); that one wins.
"""

HINTS = {
    "InvalidSpec": "the operator refused the spec (version skew with the CRD?): fix the field it names and resubmit",
    "Unschedulable": "no GPU node fits: check resources.gpu (count, product), nodeSelector and tolerations, "
                     "or wait for GPUs to free up",
    "ImagePullFailed": "the trainer image cannot be pulled: check resources.image and imagePullSecrets",
    "ContainerConfigError": "the pod cannot start: check that output.credentialsSecretRef names an existing "
                            "Secret with the expected keys",
    "OOMKilled": "the trainer ran out of host memory: raise resources.memory",
    "CudaOutOfMemory": "lower training.batchSize or maxSeqLength, raise gradientAccumulationSteps to keep the "
                       "effective batch",
    "DeadlineExceeded": "the job ran past activeDeadlineSeconds: raise it, or lower maxSteps/epochs",
    "BackoffLimitExceeded": "every attempt failed: see `qlora logs NAME` for the last attempt",
    "BadData": "fix the record at the file and line named above, then resubmit",
    "InvalidConfig": "the trainer refused the config: fix the field named above and resubmit",
    "ModelNotFound": "check spec.model.uri (an s3:// folder needs config.json and .safetensors) and its credentials",
    "StorageUnavailable": "S3 did not answer: check output.endpointUrl and the store's health",
    "StorageAccessDenied": "S3 refused the credentials: check the Secret and the bucket's policy",
    "TrainerCrashed": "the trainer died without a report: see `qlora logs NAME`",
    "PodLost": "the trainer pod vanished (node lost or pod deleted); resubmit, it resumes from its checkpoint",
    "ResultMissing": "the trainer exited 0 without a result: see `qlora logs NAME`",
    "Unexpected": "an unexpected trainer error: see `qlora logs NAME`",
}


def hint_for(reason: str | None, message: str | None) -> str | None:
    if message and "Hint:" in message:
        return message.split("Hint:", 1)[1].strip()
    return HINTS.get(reason or "")
