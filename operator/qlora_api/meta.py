"""Names that identify the QLoRAJob resource on the API server."""

GROUP = "training.qlora-operator.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "QLoRAJob"
PLURAL = "qlorajobs"
SINGULAR = "qlorajob"
SHORT_NAMES = ["qlj"]
CATEGORIES = ["qlora", "training"]

# Labels and annotations the operator puts on what it creates.
LABEL_JOB_NAME = f"{GROUP}/qlorajob"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "qlora-operator"
