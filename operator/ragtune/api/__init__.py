"""The ragtune.dev/v1alpha1 API: typed models that generate the CRDs and parse the objects."""

from .adapterdeployment import (
    AdapterDeployment,
    AdapterDeploymentPhase,
    AdapterDeploymentSpec,
    AdapterDeploymentStatus,
    AdapterSource,
    ResolvedAdapter,
    StrategyType,
)
from .common import (
    BaseModelRef,
    Condition,
    ConditionStatus,
    EvalMetrics,
    GateResult,
    MetricThresholds,
    S3Config,
    validate_artifact_uri,
    validate_endpoint,
)
from .finetunejob import (
    DatasetFormat,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    Method,
    Phase,
    QuantizationSpec,
    TrainingProgress,
)

from .keys import API_GROUP as GROUP  # noqa: E402
from .keys import API_VERSION as VERSION  # noqa: E402
from .keys import GROUP_VERSION as API_VERSION  # noqa: E402

__all__ = [name for name in dir() if not name.startswith("_")]
