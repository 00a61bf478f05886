"""FineTuneJob: what to fine-tune, on which data, and where the adapter goes."""

from __future__ import annotations

from enum import Enum
from typing import Literal, Optional

from pydantic import Field, model_validator

from .base import ApiModel, cel, k8s_extensions
from .common import (
    IMAGE_REF,
    ArtifactUri,
    BaseModelRef,
    Condition,
    CpuQuantity,
    EvalMetrics,
    ExtendedResourceName,
    GateResult,
    K8sName,
    MemoryQuantity,
    MetricThresholds,
    NodeSelector,
    PromptGap,
    S3Config,
    Toleration,
)
from .keys import GROUP_VERSION
from .prompt import DEFAULT_REFUSAL, PromptSpec


class DatasetFormat(str, Enum):
    RAG = "rag"
    MESSAGES = "messages"
    PROMPT_COMPLETION = "prompt-completion"


class DistractorStrategy(str, Enum):
    SIMILAR = "similar"
    RANDOM = "random"


class UnanswerableMix(ApiModel):
    """Relative weights of the constructions that turn an answerable item into an unanswerable
    one (normalised to sum 1; a weight of 0 turns a construction off). Each item is labelled
    with its construction, and evaluation reports refusal per construction. The default is the
    construction ragtune always used (off-topic only): measured with `bench/rag_quality.py` at its
    defaults (120 steps, SmolLM2-135M), the mix nearMiss 0.4 / answerRemoved 0.4 / offTopic 0.2
    doubled refusal on answer-removed items (0.20 -> 0.40) but tripled false refusals (0.09 ->
    0.30) and cost 0.09 F1, so it is opt-in (docs/benchmarks.md)."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": k8s_extensions(cel(
            # has(): the API server checks this rule against the schema's `default: {}` too.
            "(has(self.nearMiss) ? self.nearMiss : 0.0) + (has(self.answerRemoved) ? self.answerRemoved : 0.0)"
            " + (has(self.offTopic) ? self.offTopic : 1.0) > 0.0",
            "at least one of nearMiss, answerRemoved, offTopic must have a weight above 0",
            reason="FieldValueInvalid",
        )),
    }

    near_miss: float = Field(0.0, ge=0, le=1)
    """Gold contexts replaced by the most similar (BM25) non-gold passages of the dataset: on
    topic, without the answer - what a retriever returns when the corpus lacks it."""
    answer_removed: float = Field(0.0, ge=0, le=1)
    """The sentences of the gold contexts that contain the answer (string match after SQuAD
    normalisation) are deleted; the rest of the gold contexts stays. Items whose answer cannot
    be located (or is yes/no) fall back to `nearMiss` and are counted."""
    off_topic: float = Field(1.0, ge=0, le=1)
    """Gold contexts removed, only random passages of other records left: the easy case."""

    @model_validator(mode="after")
    def _some_weight(self) -> "UnanswerableMix":
        if self.near_miss + self.answer_removed + self.off_topic <= 0:
            raise ValueError("at least one of nearMiss, answerRemoved, offTopic must have a weight above 0")
        return self


class RaftConfig(ApiModel):
    """RAFT-style training-set construction for `rag` records: mix in distractor contexts from
    the dataset's other records, and turn a fraction of items into refusals, so the model learns
    to answer only from what it was given and to refuse when on-topic passages lack the answer.
    Records marked `answerable: false` pass through as they are (construction `userLabelled`).

    The held-out split is always built the hard way (similar distractors, equal parts of every
    unanswerable construction, the same `distractors` and `unanswerableFraction`), whatever the
    recipe here: recipes are compared, and gated, on the same test."""

    distractors: int = Field(2, ge=0, le=16)
    """Distractor contexts added to each item. An integer (the count) so existing manifests
    stay valid; how they are chosen is the sibling field `distractorStrategy` (a structural CRD
    schema cannot hold an int-or-object field)."""
    distractor_strategy: DistractorStrategy = DistractorStrategy.SIMILAR
    """`similar`: the passages of other records that BM25 ranks highest for the item's question
    (hard negatives); `random`: random passages of other records. Gold passages and exact
    duplicates of the item's own contexts are never used. Deterministic by `training.seed`."""
    unanswerable_fraction: float = Field(0.2, ge=0, le=0.9)
    """Share of answerable items turned unanswerable (target: the refusal)."""
    unanswerable_mix: UnanswerableMix = Field(default_factory=UnanswerableMix)
    """How the unanswerable items are built. An item that still contains the answer string in
    a remaining context after construction is dropped and counted."""
    refusal: str = Field(DEFAULT_REFUSAL, min_length=1, max_length=512)
    """The refusal the model is taught to give (`prompt.refusal`, when set, takes its place).
    Evaluation also recognises common paraphrases."""


class DatasetSpec(ApiModel):
    """Training data: JSONL or Parquet, one record per line/row."""

    train: ArtifactUri
    """Training data URI (`s3://bucket/key.jsonl`, a prefix of such files, or `file:///...`
    for local runs)."""
    eval: Optional[ArtifactUri] = None
    """Held-out evaluation data. Empty: `evalSplit` of `train` is held out."""
    format: DatasetFormat = DatasetFormat.RAG
    """Record format: `rag` (`question`, `contexts[{id, text}]`, `answer`, optional
    `answerable`, `supportingContextIds`), `messages` (chat turns) or `prompt-completion`."""
    eval_split: float = Field(0.1, gt=0, le=0.5)
    """Share of `train` held out for evaluation when `eval` is empty."""
    validation_split: float = Field(0.0, ge=0, le=0.5)
    """Share of the training items (what is left of `train` after the held-out split; never the
    held-out items) held out as a validation split, at most 512 items, copies of an item kept on
    one side. The validation loss (every `training.evalIntervalSteps`) is computed on it, it drives
    `training.earlyStopping`, and the published adapter is the checkpoint with the lowest
    validation loss; the held-out split is then used only for the final report and gates. 0: no
    validation split: the loss curve's eval points are the held-out split's loss, and the adapter
    is the last step's."""
    raft: RaftConfig = Field(default_factory=RaftConfig)
    """RAFT-style construction (applies to `rag` records)."""


class Method(str, Enum):
    QLORA = "qlora"
    LORA = "lora"
    DORA = "dora"
    IA3 = "ia3"


SERVABLE_METHODS = (Method.QLORA, Method.LORA)
"""Methods whose adapters the serving backends (TGI, vLLM) load; the others train and evaluate,
and an AdapterDeployment refuses them at resolution."""


class LoraSpec(ApiModel):
    """Adapter shape. `dora` uses all of it; `ia3` only `targetModules` (IA3 learns one scaling
    vector per targeted layer: no rank, no dropout)."""

    r: int = Field(16, ge=1, le=256)
    """Rank."""
    alpha: int = Field(32, ge=1, le=1024)
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0, le=0.5)
    """Dropout on the LoRA input."""
    target_modules: list[str] = Field(["all-linear"], min_length=1, max_length=64)
    """Modules that get adapters; `all-linear` means every linear layer except the output head."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Biases trained with the adapter (peft's `bias`): `none`, `all` (every bias of the base) or
    `lora_only` (the biases of the adapted layers); trained biases are saved in the adapter. Not
    for `ia3`. Serving backends may ignore or refuse adapter biases: `none` is what TGI and vLLM
    load as LoRA adapters."""


class QuantizationSpec(ApiModel):
    """Base-model quantisation for QLoRA (bitsandbytes)."""

    bits: Literal[4, 8] = 4
    """Bits per base weight: 4 for `qlora`, 8 for `lora` on an 8-bit base."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantise the quantisation constants too (saves ~0.4 bit/parameter)."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """dtype of the matmuls; `auto` is bfloat16 on GPUs that support it, float32 on CPU."""


class DistributedStrategy(str, Enum):
    AUTO = "auto"
    DDP = "ddp"
    FSDP = "fsdp"


class DistributedSpec(ApiModel):
    """How the ranks of a distributed run (`resources.nodes` x `resources.gpus` processes, one per
    GPU, or one per node on CPU) share the work. Every rank runs under `torchrun`; DDP and FSDP come
    from accelerate/transformers. The global batch is `batchSize` x world size x
    `gradientAccumulationSteps` (reported in the trainer's log and `eval/report.json`)."""

    strategy: DistributedStrategy = DistributedStrategy.AUTO
    """`ddp`: every rank holds the whole model and a share of each batch (gradients averaged).
    `fsdp`: parameters, gradients and optimizer state sharded over the ranks, for models that do
    not fit one device; with `method: qlora` the 4-bit weights are stored in the compute dtype so
    they can be sharded (ragtune sets this). `auto`: DDP when the model's weights fit one device
    (on CPU always), FSDP otherwise. Ignored for a single process."""
    rendezvous_timeout_seconds: int = Field(600, ge=1, le=86400)
    """How long the nodes of a multi-node run wait for each other in torchrun's c10d rendezvous
    (its `join_timeout`; 600 s is torchrun's own default). A node that has not joined by then (its
    pod unschedulable, its image slow to pull) ends the attempt with reason `RendezvousTimeout`,
    which the Job retries like any failed attempt. Ignored for one node."""


class PreferenceSpec(ApiModel):
    """The preference stage: DPO (trl `DPOTrainer`, sigmoid loss) after SFT, continuing the same
    adapter, on pairs rendered with the same grounded-answer prompt as SFT. `chosen` is the
    item's target (its answer, or the refusal on unanswerable items) and `rejected` the record's
    `rejected` field (e.g. HaluEval's `hallucinated_answer`). The reference model is the SFT
    adapter as it was when the stage began. Needs `dataset.format: rag`."""

    enabled: bool = False
    """Run the stage. Off: the run is SFT only."""
    beta: float = Field(0.1, gt=0, le=10)
    """DPO's beta: how far the policy may move from the SFT reference (higher: less)."""
    steps: int = Field(50, ge=1, le=100000)
    """Optimiser steps of the stage (cycling over the pairs)."""
    learning_rate: float = Field(5e-5, gt=0, le=1)
    """Peak learning rate of the stage (same scheduler and warm-up share as `training`). Lower
    than SFT's: DPO on a LoRA adapter diverges quickly at SFT rates."""
    batch_size: Optional[int] = Field(None, ge=1, le=1024)
    """Pairs per device per step (each is two sequences). Unset: `training.batchSize`."""
    max_pairs: int = Field(10000, ge=1, le=1000000)
    """Use at most this many pairs (the training items' first ones, in the seeded RAFT order)."""
    automatic_pairs: int = Field(0, ge=0, le=100000)
    """Training items without a `rejected` answer that the SFT model answers (greedy, at most
    `evaluation.maxNewTokens` tokens) before the stage: an answer that is wrong (a refusal of an
    answerable item, an answer to an unanswerable one, token F1 under 0.5 against the reference)
    or ungrounded (under half of its content words in the item's contexts) becomes `rejected`,
    the reference `chosen`. 0: only the data's pairs. Costs one generation per item."""


class EarlyStoppingSpec(ApiModel):
    """Stop training when the validation metric stops improving (needs `dataset.validationSplit`).
    The published adapter is the best checkpoint whether or not the run stopped early."""

    metric: Literal["evalLoss"] = "evalLoss"
    """The validation metric (lower is better): `evalLoss`, the answer-token loss on the
    validation split."""
    patience: int = Field(3, ge=1, le=1000)
    """Validation points in a row without an improvement of more than `minDelta` over the best
    so far that stop the run."""
    min_delta: float = Field(0.0, ge=0, le=100)
    """Smallest decrease of the metric that counts as an improvement."""


class TrainingSpec(ApiModel):
    """Optimisation settings. Unset precision/checkpointing settings are chosen by device."""

    epochs: float = Field(1.0, gt=0, le=100)
    """Passes over the training set (ignored when `maxSteps` is set)."""
    max_steps: Optional[int] = Field(None, ge=1)
    """Stop after this many optimiser steps."""
    learning_rate: float = Field(2e-4, gt=0, le=1)
    """Peak learning rate."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: float = Field(0.03, ge=0, le=0.5)
    """Share of steps spent warming up."""
    batch_size: int = Field(4, ge=1, le=1024)
    """Sequences per device per step."""
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    """Micro-batches accumulated per optimiser step."""
    max_seq_length: int = Field(1024, ge=32, le=131072)
    """Longest training sequence in tokens; longer items are reported by validation."""
    packing: Optional[bool] = None
    """Padding-free packing of several items per row (no cross-item attention). Unset: on
    where the attention implementation supports it."""
    gradient_checkpointing: Optional[bool] = None
    """Recompute activations to save memory. Unset: on for GPUs, off on CPU."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Training precision; `auto` is bf16 on capable GPUs, fp32 on CPU."""
    seed: int = Field(42, ge=0)
    """Seed for data order, RAFT construction and initialisation."""
    checkpoint_interval_steps: int = Field(50, ge=1)
    """Save and upload a full resumable checkpoint every this many steps."""
    checkpoint_interval_seconds: int = Field(600, ge=30)
    """...or when this much time has passed since the last one, whichever comes first."""
    eval_interval_steps: Optional[int] = Field(None, ge=1)
    """Compute the validation loss every this many steps (and at the last step). Unset: a
    quarter of the run, or a tenth of it with `earlyStopping`."""
    early_stopping: Optional[EarlyStoppingSpec] = None
    """Stop when the validation loss stops improving. Needs `dataset.validationSplit` > 0.
    Unset: the run trains to `maxSteps` (or `epochs`)."""
    optimizer: Literal["adamw_torch_fused", "adamw_torch", "adafactor", "sgd", "adamw_8bit",
                       "paged_adamw_8bit"] = "adamw_torch_fused"
    """The optimiser (transformers' `optim`): `adamw_torch_fused` (torch's fused AdamW, CPU and
    GPU), `adamw_torch`, `adafactor` (factored second moments, less memory; fixed `learningRate`
    schedule, no relative step), `sgd`, or bitsandbytes' `adamw_8bit` / `paged_adamw_8bit`
    (8-bit optimiser state; need a GPU, `resources.gpus` > 0)."""
    weight_decay: float = Field(0.0, ge=0, le=1)
    """Decoupled weight decay on the trained weights (not on biases and norm weights)."""
    max_grad_norm: float = Field(1.0, ge=0, le=1000)
    """Clip the gradient's global norm to this; 0 turns clipping off."""
    report_to: list[Literal["tensorboard"]] = Field(default_factory=list, max_length=1)
    """Experiment tracking, off when empty. `tensorboard`: TensorBoard event files of every
    stage (losses, learning rate, gradient norm, validation loss), uploaded under
    `<run>/tracking/tensorboard/<stage>/` with each checkpoint and listed in `manifest.json`.
    MLflow is not offered (its server or file store is not part of the trainer image)."""
    preference: PreferenceSpec = Field(default_factory=PreferenceSpec)
    """The optional preference (DPO) stage after SFT. Its steps are not checkpointed: a retry
    after a failure in the stage reruns it from the finished SFT adapter."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """Data parallelism or sharding when the run has more than one process (`resources.nodes`,
    `resources.gpus`)."""


class EvaluationSpec(ApiModel):
    """Held-out evaluation of base vs adapter, and the gates the run must pass."""

    max_samples: int = Field(64, ge=1, le=100000)
    """Evaluate at most this many held-out items."""
    max_new_tokens: int = Field(128, ge=1, le=4096)
    """Generation budget per answer."""
    few_shot: int = Field(2, ge=0, le=8)
    """Training items shown to the base model as earlier chat turns for the few-shot baseline the
    report puts beside the zero-shot base ("was fine-tuning worth it?"); answerable and
    unanswerable in turn. 0: no few-shot baseline. Costs one more pass over the held-out items,
    with prompts this many items longer."""
    thresholds: MetricThresholds = Field(default_factory=MetricThresholds)
    """Gates; a run whose adapter fails any of them ends `Failed` with reason `GateFailed`
    (its artifacts are kept for inspection)."""


class OutputSpec(ApiModel):
    """Where results go: `<uri>/<namespace>/<name>/<runId>/{adapter,checkpoints,eval}/`,
    `manifest.json` last."""

    uri: ArtifactUri
    """S3 prefix (or `file:///...` for local runs)."""


class ResourcesSpec(ApiModel):
    """Where and with what the training pod runs."""

    gpus: int = Field(1, ge=0, le=64)
    """GPUs requested per node (as `gpuResourceName` limits of each training pod); one training
    process per GPU. 0 runs on CPU, one process per node."""
    nodes: int = Field(1, ge=1, le=64)
    """Training pods (nodes). 1: one pod, as a plain Job. More: an Indexed Job of this many pods
    plus a headless Service; every pod runs `torchrun` and the ranks meet at index 0 (c10d
    rendezvous); world size = nodes x max(gpus, 1). More than one node with `gpus: 0` is allowed:
    CPU processes on the gloo backend (slow; for tests and small models). Any rank failing fails
    the attempt: all ranks restart together from the newest complete checkpoint."""
    gpu_resource_name: ExtendedResourceName = "nvidia.com/gpu"
    """Extended resource name of the GPU."""
    cpu: CpuQuantity = "4"
    """CPU request (greater than zero)."""
    memory: MemoryQuantity = "32Gi"
    """Memory request and limit (greater than zero)."""
    shm_size: MemoryQuantity = "8Gi"
    """Size of the in-memory `/dev/shm` (data-loader workers need it; greater than zero)."""
    node_selector: NodeSelector = Field(default_factory=dict)
    """Node labels the pod must match."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Tolerations, e.g. for tainted GPU nodes."""
    priority_class_name: Optional[K8sName] = None
    """PriorityClass of the training pod."""
    image: Optional[str] = Field(None, max_length=512, pattern=IMAGE_REF)
    """Trainer image override (default: the operator's configured trainer image)."""
    service_account_name: Optional[K8sName] = None
    """ServiceAccount for the training pod (e.g. for IRSA). Its token is not mounted unless
    the account asks for it."""


class FineTuneJobSpec(ApiModel):
    """The desired fine-tuning run."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": k8s_extensions(
            cel(
                "self.method != 'qlora' || !has(self.quantization) || self.quantization.bits == 4",
                "method qlora requires quantization.bits 4",
                field_path=".quantization.bits",
                reason="FieldValueInvalid",
            ),
            cel(
                "self.method != 'lora' || !has(self.quantization) || self.quantization.bits == 8",
                "4-bit quantization is method qlora: with method lora leave quantization out "
                "(16-bit base) or set quantization.bits 8",
                field_path=".quantization.bits",
                reason="FieldValueInvalid",
            ),
            cel(
                "!(self.method in ['dora', 'ia3']) || !has(self.quantization)",
                "methods dora and ia3 train on a 16-bit base: leave quantization out",
                field_path=".quantization",
                reason="FieldValueInvalid",
            ),
            cel(
                "!has(self.quantization) || self.resources.gpus > 0 || "
                "self.quantization.computeDtype != 'float16'",
                "quantization.computeDtype float16 needs a GPU (resources.gpus > 0)",
                field_path=".quantization.computeDtype",
                reason="FieldValueInvalid",
            ),
            cel(
                "!has(self.training) || !has(self.training.distributed) || "
                "!has(self.training.distributed.strategy) || self.training.distributed.strategy != 'fsdp' || "
                "!has(self.quantization) || self.quantization.bits != 8",
                "training.distributed.strategy fsdp cannot shard an 8-bit (bitsandbytes int8) base: use "
                "method qlora (4-bit) or lora without quantization, or strategy ddp",
                field_path=".training.distributed.strategy",
                reason="FieldValueInvalid",
            ),
            cel(
                "!has(self.training) || !has(self.training.preference) || !has(self.training.preference.enabled)"
                " || !self.training.preference.enabled || !has(self.dataset.format) || self.dataset.format == 'rag'",
                "training.preference needs dataset.format rag (pairs are rag records with a 'rejected' answer)",
                field_path=".training.preference.enabled",
                reason="FieldValueInvalid",
            ),
            cel(
                "!has(self.training) || !has(self.training.earlyStopping) || "
                "(has(self.dataset.validationSplit) && self.dataset.validationSplit > 0.0)",
                "training.earlyStopping needs a validation split: set dataset.validationSplit above 0",
                field_path=".training.earlyStopping",
                reason="FieldValueInvalid",
            ),
            cel(
                "!has(self.training) || !has(self.training.optimizer) || "
                "!(self.training.optimizer in ['adamw_8bit', 'paged_adamw_8bit']) || "
                "!has(self.resources) || !has(self.resources.gpus) || self.resources.gpus > 0",
                "training.optimizer adamw_8bit and paged_adamw_8bit (bitsandbytes) need a GPU (resources.gpus > 0)",
                field_path=".training.optimizer",
                reason="FieldValueInvalid",
            ),
            cel(
                "self.method != 'ia3' || !has(self.lora) || !has(self.lora.bias) || self.lora.bias == 'none'",
                "lora.bias is for LoRA-based methods: with method ia3 leave it out",
                field_path=".lora.bias",
                reason="FieldValueInvalid",
            ),
            cel(
                "!has(self.queueName) || !has(self.suspend) || !self.suspend",
                "a FineTuneJob with spec.queueName is started and stopped by its Kueue queue: leave "
                "spec.suspend out (to hold it, stop the LocalQueue with its stopPolicy, or delete the run)",
                field_path=".suspend",
                reason="FieldValueForbidden",
            ),
            cel(
                "!has(self.dataset.eval) || self.dataset.eval != self.dataset.train",
                "dataset.eval must differ from dataset.train (held-out data)",
                field_path=".dataset.eval",
                reason="FieldValueInvalid",
            ),
        )
    }

    base_model: BaseModelRef
    """The model to adapt."""
    dataset: DatasetSpec
    """Training (and evaluation) data."""
    method: Method = Method.QLORA
    """`qlora` (4-bit base, LoRA on top), `lora` (16-bit or 8-bit base), `dora` (weight-decomposed
    LoRA, peft `use_dora`, 16-bit base) or `ia3` (learned activation scaling, 16-bit base). TGI and
    vLLM load `lora` and `qlora` adapters only: `dora` and `ia3` train and evaluate, and an
    AdapterDeployment refuses them at resolution."""
    lora: LoraSpec = Field(default_factory=LoraSpec)
    """Adapter shape."""
    quantization: Optional[QuantizationSpec] = None
    """Base-model quantisation. Unset: 4-bit nf4 with double quantisation for `qlora`, none
    (16-bit base) for `lora`."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Optimisation settings."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """Evaluation and gates."""
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    """The prompt contract: how questions and contexts are put to the model in training,
    evaluation and serving (published with the adapter as `adapter/prompt.json`)."""
    output: OutputSpec
    """Where artifacts go."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Pod placement and resources."""
    s3: S3Config = Field(default_factory=S3Config)
    """S3 endpoint and credentials."""
    backoff_limit: int = Field(2, ge=0, le=20)
    """Retries of the training pod (a retry resumes from the newest checkpoint)."""
    active_deadline_seconds: Optional[int] = Field(None, ge=60)
    """Wall-clock limit of the whole run; exceeding it fails the job with `DeadlineExceeded`."""
    suspend: bool = False
    """Suspend the run: the training pod is stopped (it checkpoints first) and resumed when
    this is set back to false."""
    queue_name: Optional[str] = Field(None, min_length=1, max_length=63,
                                      pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Kueue LocalQueue (in this namespace) that admits the run: the training Job is created
    suspended with the label `kueue.x-k8s.io/queue-name`, Kueue starts it when the queue's quota
    allows (and may suspend it again to preempt it), and the operator never touches its
    `suspend`; until then the run is `Queued` with Kueue's reason. Cannot be combined with
    `suspend`."""

    @model_validator(mode="after")
    def _queue_owns_suspend(self) -> "FineTuneJobSpec":
        if self.queue_name is not None and self.suspend:
            raise ValueError("a FineTuneJob with spec.queueName is started and stopped by its Kueue queue: "
                             "leave spec.suspend out")
        return self

    @model_validator(mode="after")
    def _method_base(self) -> "FineTuneJobSpec":
        if self.method in (Method.DORA, Method.IA3) and self.quantization is not None:
            raise ValueError("methods dora and ia3 train on a 16-bit base: leave quantization out")
        return self

    @model_validator(mode="after")
    def _early_stopping_needs_validation(self) -> "FineTuneJobSpec":
        if self.training.early_stopping is not None and self.dataset.validation_split <= 0:
            raise ValueError("training.earlyStopping needs a validation split: set dataset.validationSplit above 0")
        return self

    @model_validator(mode="after")
    def _optimizer_device(self) -> "FineTuneJobSpec":
        if self.training.optimizer in ("adamw_8bit", "paged_adamw_8bit") and self.resources.gpus == 0:
            raise ValueError(f"training.optimizer {self.training.optimizer} (bitsandbytes) needs a GPU "
                             "(resources.gpus > 0)")
        return self

    @model_validator(mode="after")
    def _bias_method(self) -> "FineTuneJobSpec":
        if self.method == Method.IA3 and self.lora.bias != "none":
            raise ValueError("lora.bias is for LoRA-based methods: with method ia3 leave it out")
        return self

    @model_validator(mode="after")
    def _preference_needs_rag(self) -> "FineTuneJobSpec":
        if self.training.preference.enabled and self.dataset.format != DatasetFormat.RAG:
            raise ValueError("training.preference needs dataset.format rag "
                             "(pairs are rag records with a 'rejected' answer)")
        return self

    @model_validator(mode="after")
    def _fsdp_needs_shardable_weights(self) -> "FineTuneJobSpec":
        if self.training.distributed.strategy == DistributedStrategy.FSDP and self.quantization is not None \
                and self.quantization.bits == 8:
            raise ValueError("training.distributed.strategy fsdp cannot shard an 8-bit (bitsandbytes int8) "
                             "base: use method qlora (4-bit) or lora without quantization, or strategy ddp")
        return self


class Phase(str, Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    EVALUATING = "Evaluating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    QUEUED = "Queued"


class TrainingProgress(ApiModel):
    """Live progress reported by the trainer (updated at a bounded rate)."""

    step: int = 0
    """Optimiser steps done."""
    total_steps: Optional[int] = None
    """Optimiser steps planned."""
    epoch: Optional[float] = None
    """Fractional epoch."""
    loss: Optional[float] = None
    """Latest training loss."""
    eval_loss: Optional[float] = None
    """Latest validation loss."""
    tokens_per_second: Optional[float] = None
    """Loss-bearing tokens per second."""
    eta_seconds: Optional[int] = None
    """Estimated seconds until training ends."""
    percent: Optional[int] = None
    """`step` / `totalSteps` in percent."""
    stage: Optional[str] = None
    """What the trainer is doing: `loading`, `training` (SFT), `preference` (the DPO stage),
    `evaluating`, `uploading`."""
    updated_at: Optional[str] = None
    """When this progress was reported (RFC 3339)."""


class AdapterArtifact(ApiModel):
    """The adapter a successful run produced."""

    uri: str
    """Run prefix: `<output.uri>/<namespace>/<name>/<runId>/`; the adapter is in `adapter/`."""
    sha256: str
    """sha256 of `manifest.json`, which in turn lists the sha256 of every adapter file."""
    size_bytes: Optional[int] = None
    """Total size of the adapter files."""
    report_uri: Optional[str] = None
    """Human-readable evaluation report."""
    prompt_uri: Optional[str] = None
    """The prompt contract the adapter was trained with (`adapter/prompt.json`): format requests
    with it (`ragtune prompt render`)."""
    prompt_sha256: Optional[str] = None
    """sha256 of `prompt.json` (also listed in `manifest.json`)."""
    eval_set_uri: Optional[str] = None
    """The held-out split the run evaluated on (`eval/heldout.jsonl`, `rag` records as built for
    evaluation, each with its `construction` label): an AdapterDeployment's online gate uses it
    when `gates.online.evalSetUri` is empty."""
    eval_set_sha256: Optional[str] = None
    """sha256 of that file (also listed in `manifest.json`); the online evaluator verifies it."""


class FineTuneJobMetrics(ApiModel):
    """Base vs adapter on the held-out split, and the gates."""

    base: EvalMetrics = Field(default_factory=EvalMetrics)
    """The base model."""
    adapter: EvalMetrics = Field(default_factory=EvalMetrics)
    """The base model with the adapter."""
    passed: Optional[bool] = None
    """Whether every gate held."""
    gates: list[GateResult] = Field(default_factory=list)
    """One entry per configured threshold."""
    foreign_prompt: Optional[EvalMetrics] = None
    """The adapter on the same held-out items under a fixed foreign prompt (other wording,
    layout and context format, never used in training): does it keep its behaviour in another
    application's prompt?"""
    foreign_prompt_gap: Optional[PromptGap] = None
    """`adapter` vs `foreignPrompt`: the gate `maxForeignPromptGap` holds `max`."""


class WorkersStatus(ApiModel):
    """The training pods of a multi-node run (`resources.nodes` > 1)."""

    ready: int = 0
    """Pods of the current attempt whose trainer is running."""
    total: int = 0
    """Pods one attempt needs (`resources.nodes`)."""
    world_size: int = 0
    """Training processes over all pods: nodes x max(gpus, 1)."""


class AttemptRecord(ApiModel):
    """An attempt of the run that ended without success: failed, preempted or evicted."""

    attempt: int = Field(ge=1)
    """1-based, in the order the attempts ended."""
    pod: str
    """Its training pod (index 0's for a multi-node run)."""
    reason: str
    """Why it ended, as the `Running` condition said then (e.g. `S3Unreachable`, `Preempted`, `OutOfMemory`)."""
    message: str = ""
    """What happened, in one line (the termination message or the condition's message)."""
    finished_at: Optional[str] = None
    """When its trainer terminated."""


MAX_ATTEMPT_HISTORY = 20


class FineTuneJobStatus(ApiModel):
    """Observed state, written by the operator."""

    phase: Optional[Phase] = None
    """Pending, Queued (waiting for its Kueue queue), Running, Evaluating, Succeeded, Failed or Suspended."""
    message: Optional[str] = None
    """One line on what is happening or what went wrong."""
    observed_generation: Optional[int] = None
    """The `metadata.generation` the status describes."""
    conditions: list[Condition] = Field(default_factory=list)
    """`Ready` (inputs resolved), `Running`, `Succeeded`, `Failed`, `Suspended`."""
    job_name: Optional[str] = None
    """The batch/v1 Job running the trainer."""
    run_id: Optional[str] = None
    """Artifact folder of this generation's run."""
    attempts: int = 0
    """Attempts started so far: training pods, or sets of `resources.nodes` pods for a multi-node run
    (retries resume from checkpoints)."""
    workers: Optional[WorkersStatus] = None
    """Multi-node runs: how many of the attempt's pods are training, of how many, and the world size."""
    attempt_history: list[AttemptRecord] = Field(default_factory=list, max_length=MAX_ATTEMPT_HISTORY)
    """The current run's attempts that ended without success, oldest first (the newest 20). A
    preemption is listed although it does not count against `backoffLimit`."""
    start_time: Optional[str] = None
    """When the first training pod started."""
    completion_time: Optional[str] = None
    """When the run ended."""
    progress: Optional[TrainingProgress] = None
    """Live training progress."""
    adapter: Optional[AdapterArtifact] = None
    """The produced adapter (Succeeded runs, and gate failures for inspection)."""
    metrics: Optional[FineTuneJobMetrics] = None
    """Evaluation results."""
    score: Optional[str] = None
    """Headline for `kubectl get`: adapter F1 and refusal rate."""


class FineTuneJob(ApiModel):
    """A QLoRA/LoRA fine-tuning run of a RAG generator, with evaluation gates."""

    api_version: Literal[GROUP_VERSION] = GROUP_VERSION
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: dict = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: Optional[FineTuneJobStatus] = None
