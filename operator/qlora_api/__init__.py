"""The QLoRAJob API: the one source of truth shared by the operator, the trainer and the CRD.

Importing this package needs pydantic only (no kopf, no torch), so the trainer validates its
config with exactly the models the operator and the API server's schema come from.
"""

from qlora_api.meta import API_VERSION, GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from qlora_api.protocol import (
    ExitCode,
    TrainerError,
    TrainerPhaseLine,
    TrainerProgressLine,
    TrainerResultMessage,
    TrainerRunConfig,
)
from qlora_api.spec import QLoRAJobSpec
from qlora_api.status import (
    Condition,
    ConditionType,
    PublishedFile,
    QLoRAJobStatus,
    Reason,
    TrainingProgress,
    TrainingResult,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "VERSION",
    "Condition",
    "ConditionType",
    "ExitCode",
    "PublishedFile",
    "QLoRAJobSpec",
    "QLoRAJobStatus",
    "Reason",
    "TrainerError",
    "TrainerPhaseLine",
    "TrainerProgressLine",
    "TrainerResultMessage",
    "TrainerRunConfig",
    "TrainingProgress",
    "TrainingResult",
]
