"""Every name ragtune puts on the wire: API group and version, and every label and annotation key
on the objects it creates. Declared once here; everything else imports them."""

from __future__ import annotations

API_GROUP = "ragtune.dev"
API_VERSION = "v1alpha1"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"
"""The `apiVersion` of FineTuneJob and AdapterDeployment."""
FINETUNEJOBS = "finetunejobs"
ADAPTERDEPLOYMENTS = "adapterdeployments"

# --- Well-known Kubernetes labels (recommended labels) -------------------------------------

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
MANAGED_BY = "ragtune"
"""Value of `app.kubernetes.io/managed-by` on every child object."""
ANNOTATION_JOB_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
"""Set by the Job controller on each pod of an Indexed Job: its index (index 0 speaks for a multi-node run)."""
LABEL_KUEUE_QUEUE_NAME = "kueue.x-k8s.io/queue-name"
"""On a trainer Job of a FineTuneJob with `spec.queueName`: the Kueue LocalQueue that admits it."""
KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_VERSION = "v1beta2"
"""The Kueue API the operator reads Workloads from (Kueue's storage version since v0.15)."""

# --- ragtune's labels and annotations ----------------------------------------------------------

LABEL_FINETUNEJOB = f"{API_GROUP}/finetunejob"
"""On a trainer Job and its pods: the owning FineTuneJob (a label value: truncated + hashed)."""
LABEL_GENERATION = f"{API_GROUP}/generation"
"""On a trainer Job: the FineTuneJob generation it runs."""
LABEL_RUN_ID = f"{API_GROUP}/run-id"
"""On a trainer Job: its run folder (stable across the retries of one generation)."""
ANNOTATION_SPEC_HASH = f"{API_GROUP}/spec-hash"
"""On a trainer Job: hash of the spec it was rendered from."""
ANNOTATION_FINETUNEJOB = f"{API_GROUP}/finetunejob-name"
"""On a trainer Job: the owning FineTuneJob's full name (the label may be truncated)."""

LABEL_ADAPTERDEPLOYMENT = f"{API_GROUP}/adapterdeployment"
"""On serving Deployments, Services, evaluation Jobs and their pods: the owning AdapterDeployment."""
ANNOTATION_ADAPTERDEPLOYMENT = f"{API_GROUP}/adapterdeployment-name"
"""On the same objects: the owning AdapterDeployment's full name (the label may be shortened)."""
LABEL_TRACK = f"{API_GROUP}/track"
"""`stable`, `canary` or `eval`."""
ANNOTATION_ADAPTER_SET = f"{API_GROUP}/adapter-set"
"""On a serving Deployment: digest of the adapter set it serves."""
ANNOTATION_ADAPTERS = f"{API_GROUP}/adapters"
"""On a serving Deployment: the adapters it serves (name=sha256, comma separated)."""
ANNOTATION_ORIGINAL_TEMPLATE = f"{API_GROUP}/original-template"
"""On a referenced (user-owned) Deployment: its pod template before ragtune changed it."""
ANNOTATION_TEMPLATE_HASH = f"{API_GROUP}/template-hash"
"""On a serving Deployment: hash of the template ragtune rendered."""
ANNOTATION_ROLLED_AT = f"{API_GROUP}/rolled-at"
"""On a serving Deployment's pod template: when ragtune last rolled it."""
ANNOTATION_ROUTE_HASH = f"{API_GROUP}/route-hash"
"""On the HTTPRoute of a `Canary` strategy: hash of the spec ragtune rendered (weights included)."""
ANNOTATION_ROLLOUT_DECISION = f"{API_GROUP}/rollout-decision"
"""On an AdapterDeployment with `strategy.autoRollback: false` whose traffic analysis failed:
`rollback <token>` or `resume <token>`, `<token>` being `status.candidate.traffic.awaitingDecision`
(a decision left from an earlier failure names another token and is ignored)."""

LABEL_LOCAL_RUNNER = f"{API_GROUP}/local-runner"
"""On the local platform's node: the pod runner runs its pods (see localplatform/)."""

# --- kopf's state on our objects ----------------------------------------------------------------

FINALIZER = f"{API_GROUP}/finalizer"
KOPF_ANNOTATION_PREFIX = API_GROUP
"""kopf's progress and last-handled-configuration annotations live under this prefix."""
