"""What a fine-tuning run is: one frozen config per concern, validated before any work starts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llm_platform.config import FrozenConfig
from llm_platform.dtypes import FloatDType

Method = Literal["full", "lora", "qlora", "prompt_tuning"]
DType = FloatDType  # float32/fp32, bfloat16/bf16, float16/fp16


class LoraSettings(FrozenConfig):
    """Low-rank adapters; the defaults are the course's QLoRA settings."""

    r: int = Field(64, ge=1, le=1024)
    """Rank of the update matrices."""
    alpha: int = Field(16, ge=1)
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Linear layers that get an adapter."""


class QuantSettings(FrozenConfig):
    """bitsandbytes 4-bit quantization of the frozen base (QLoRA)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; NF4 matches normally distributed weights."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per parameter)."""
    compute_dtype: DType = "float32"
    """Dtype the 4-bit weights are dequantized to for matmuls (bfloat16 on GPUs)."""


class PromptTuningSettings(FrozenConfig):
    """Soft prompts: trainable virtual-token embeddings prepended to every input."""

    num_virtual_tokens: int = Field(16, ge=1, le=512)
    """Number of virtual tokens."""
    init_text: str | None = None
    """Initialise the virtual tokens from this text's embeddings (random when unset)."""


FORMAT_COLUMNS = ("text", "prompt", "completion", "messages")
"""Standard column names of TRL's dataset formats that ``data.columns`` can map other names onto."""
TaskName = Literal["sentiment", "dialogsum", "chat", "chat_unfiltered"]
TASK_OF_SYNTHETIC = {"synthetic:sentiment": "sentiment", "synthetic:dialogsum": "dialogsum",
                     "synthetic:preferences": "chat"}


class DataSettings(FrozenConfig):
    """Where records come from and which of TRL's dataset formats they are in.

    Formats (as TRL and the hub use them): ``text`` (language modelling: every token carries loss),
    ``prompt``/``completion`` (strings, or lists of ``{"role", "content"}`` messages rendered with the
    model's chat template) and ``messages`` (a multi-turn conversation, ``system`` turns included)."""

    source: str = "synthetic:sentiment"
    """``synthetic:NAME``, a JSONL/Parquet file or folder of split files (local or ``s3://``, ``gs://``), or a
    hub dataset name."""
    task: TaskName | None = None
    """A built-in task that turns its records into prompt/completion pairs (sentiment and dialogsum: their
    instruction templates; chat, chat_unfiltered: a preference set's prompt and reply as a conversation).
    Unset: ``synthetic:sentiment``/``dialogsum``/``preferences`` use sentiment/dialogsum/chat, any other source
    is read as it is, in the format its columns show."""
    format: Literal["auto", "text", "prompt_completion", "messages"] = "auto"
    """The records' format; auto: ``messages`` if that column exists, else ``prompt`` + ``completion``, else
    ``text`` (a ShareGPT ``conversations`` column of ``from``/``value`` turns is converted to ``messages``)."""
    columns: dict[str, str] = {}
    """Standard name -> the dataset's column, for data whose columns are named otherwise, e.g.
    ``{prompt: question, completion: answer}`` or ``{messages: dialog}``."""
    loss_on: Literal["completion", "all"] = "completion"
    """completion: only completions (prompt/completion) and assistant turns (messages) carry loss; all: every
    token, prompts and user turns too. Text data is always trained on every token."""
    subset: str | None = None
    """Hub dataset configuration name, if any."""
    eval_source: str | None = None
    """Held-out data (a file, folder or URI in the same format); unset: the source's validation/test splits,
    or for a single file (or a folder with only a train split) the last ``eval_fraction`` of its rows."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of a single file's rows held out for validation when it has no held-out split."""
    train_limit: int | None = Field(None, ge=1)
    """Use at most this many training records."""
    eval_limit: int | None = Field(200, ge=1)
    """Held-out records for validation loss and accuracy."""
    max_length: int = Field(256, ge=8)
    """Examples are truncated to this many tokens: text and conversations keep their start (as TRL does),
    prompt/completion pairs their end, where the completion is."""

    @model_validator(mode="after")
    def _check(self) -> "DataSettings":
        unknown = sorted(set(self.columns) - set(FORMAT_COLUMNS))
        if unknown:
            raise ValueError(f"data.columns: unknown standard name(s) {unknown}; map one of "
                             f"{', '.join(FORMAT_COLUMNS)} to your column, e.g. {{prompt: question}}")
        if self.task and (self.columns or self.format != "auto"):
            raise ValueError(f"data.task={self.task} reads its own columns; data.columns and data.format apply "
                             "to records used as they are (leave data.task unset)")
        return self

    @property
    def resolved_task(self) -> str | None:
        """The built-in task, if any (explicit, or implied by a synthetic source)."""
        if self.task:
            return self.task
        if self.format == "auto" and not self.columns:
            return TASK_OF_SYNTHETIC.get(self.source)
        return None


class OptimSettings(FrozenConfig):
    """The optimizer and the step schedule."""

    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Share of steps with a linearly rising learning rate; then it decays linearly to 0."""
    max_steps: int = Field(100, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(16, ge=1)
    """Global batch per optimizer step: split evenly across workers, so 1 and N workers take the same steps."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step: each worker's share of ``batch_size`` goes through forward and
    backward in this many parts, their gradients summed before one step. The same update as one pass over
    the whole batch, with the activation memory of one part; ``batch_size`` stays the effective batch."""
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    """Steps between progress lines / metrics rows."""
    eval_every: int = Field(0, ge=0)
    """Steps between validation passes (0: only at the end)."""
    save_every: int = Field(0, ge=0)
    """Steps between checkpoints (0: only at the end)."""


def check_batch(optim: OptimSettings, scaling: "ScalingSettings") -> None:
    """The global batch splits evenly into workers and each worker's share into micro-batches."""
    if optim.batch_size % scaling.num_workers:
        raise ValueError(f"optim.batch_size ({optim.batch_size}) must be a multiple of "
                         f"scaling.num_workers ({scaling.num_workers})")
    share = optim.batch_size // scaling.num_workers
    if share % optim.gradient_accumulation_steps:
        raise ValueError(f"optim.gradient_accumulation_steps ({optim.gradient_accumulation_steps}) must divide "
                         f"each worker's share of optim.batch_size ({optim.batch_size} / {scaling.num_workers} "
                         f"worker(s) = {share})")


class ScalingSettings(FrozenConfig):
    """How many Ray Train workers, on what, sharded how."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    """One GPU per worker, NCCL; otherwise CPU workers with gloo."""
    cpus_per_worker: float = Field(1, gt=0)
    sharding: Literal["auto", "fsdp", "ddp"] = "auto"
    """auto: FSDP for full and LoRA fine-tuning with more than one worker, DDP otherwise."""
    max_failures: int = Field(2, ge=0)
    """Worker-group restarts (from the last checkpoint) before the run fails."""


Tracker = Literal["mlflow", "tensorboard", "wandb"]


class TrackingSettings(FrozenConfig):
    """Where metrics are logged besides ``metrics.jsonl``."""

    report_to: list[Tracker] = ["tensorboard"]
    """Any of mlflow, tensorboard, wandb (``[]``: metrics.jsonl only). TensorBoard event files go to
    OUTPUT_DIR/tensorboard (``tensorboard --logdir OUTPUT_DIR/tensorboard``)."""
    experiment: str | None = None
    """MLflow experiment and W&B project (default: the job's name, e.g. ``llmp-sft``)."""
    mlflow_tracking_uri: str | None = None
    """An MLflow tracking server or store (``http://host:5000``, ``sqlite:///mlflow.db``, ``databricks``);
    default: a local file store, ``file:OUTPUT_DIR/mlruns`` (``mlflow ui --backend-store-uri ...``)."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline: runs are written under OUTPUT_DIR/wandb (``wandb sync`` uploads them later)."""


class SFTConfig(FrozenConfig):
    """A supervised fine-tuning run (``python -m train_jobs.sft --config FILE``)."""

    model: str
    """Base checkpoint: a local folder or a hub id."""
    method: Method = "lora"
    dtype: DType = "float32"
    """Compute dtype (float32 on CPU; bfloat16 on GPUs). With FSDP it is mixed precision: weights and
    optimizer in float32, each layer computed in this dtype, gradients reduced in float32; otherwise
    the weights are stored in it."""
    gradient_checkpointing: bool = False
    """Activation checkpointing: each decoder layer's activations are recomputed in the backward pass
    instead of kept (transformers' ``gradient_checkpointing_enable``, non-reentrant): far less memory
    for long sequences and large models, ~30% more compute. The gradients are the same."""
    trust_remote_code: bool = False
    """Run the Python code a model folder or hub repo ships (``auto_map`` in its config) to build its
    model and tokenizer. Off by default: such code runs with the job's rights; turn it on only for
    models you trust."""
    output_dir: str = "artifacts/sft"
    """Where metrics.jsonl, summary.json and adapter/ or model/ go: a folder or an s3://, gs:// URI."""
    storage_path: str | None = None
    """Ray Train checkpoints and run state (folder or URI); defaults to OUTPUT_DIR/ray."""
    run_name: str = "sft"
    """Name of the run under storage_path; a rerun with the same name resumes from its last checkpoint."""
    lora: LoraSettings = LoraSettings()
    quant: QuantSettings = QuantSettings()
    prompt_tuning: PromptTuningSettings = PromptTuningSettings()
    data: DataSettings = DataSettings()
    optim: OptimSettings = OptimSettings()
    scaling: ScalingSettings = ScalingSettings()
    tracking: TrackingSettings = TrackingSettings()
    register_url: str | None = None
    """A running server (http://host:port) to register the trained adapter with."""
    register_name: str | None = None
    """Adapter name for registration (default: run_name)."""
    register_base: str | None = None
    """The server's id of the base model (required with register_url)."""

    @model_validator(mode="after")
    def _check(self) -> "SFTConfig":
        check_batch(self.optim, self.scaling)
        if self.register_url and self.method == "full":
            raise ValueError("register_url: only adapters (lora, qlora, prompt_tuning) can be registered")
        if self.register_url and not self.register_base:
            raise ValueError("register_base: required with register_url (the server's id of the base model)")
        if self.method == "qlora" and self.scaling.sharding == "fsdp":
            raise ValueError("scaling.sharding: QLoRA's 4-bit base is replicated (ddp), not FSDP-sharded")
        return self

    @property
    def is_adapter(self) -> bool:
        return self.method != "full"

    @property
    def sharding(self) -> str:
        """``none`` (one worker), ``fsdp`` or ``ddp``."""
        if self.scaling.num_workers == 1:
            return "none"
        if self.scaling.sharding != "auto":
            return self.scaling.sharding
        return "fsdp" if self.method in ("full", "lora") else "ddp"


def training_settings(cfg: SFTConfig) -> dict:
    """The settings a checkpoint depends on (not where outputs go, how many retries, or registration)."""
    data = cfg.model_dump(include={"model", "method", "dtype", "lora", "quant", "prompt_tuning", "data", "optim"})
    return {key: value for key, value in data.items()
            if key in ("model", "method", "dtype", "data", "optim") or key == _method_settings(cfg.method)}


def _method_settings(method: str) -> str | None:
    return {"lora": "lora", "qlora": "quant", "prompt_tuning": "prompt_tuning"}.get(method)
