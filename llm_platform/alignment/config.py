"""The alignment jobs' configs: the reward model, DPO, and RLHF with PPO (rollout engines, sampling, PPO
settings, the policy's LoRA). Nothing here imports torch, datasets or the trainers, so that
``python -m train_jobs.X`` checks its config in a second."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from llm_platform.config import FrozenConfig
from llm_platform.training.config import (DType, LoraSettings, OptimSettings, ScalingSettings, TrackingSettings,
                                          check_batch)


class PreferenceData(FrozenConfig):
    """Where the preference pairs come from."""

    source: str = "synthetic:preferences"
    """``synthetic:preferences``, a JSONL/Parquet file or folder of split files, or a hub dataset, with
    ``prompt``, ``chosen`` and ``rejected`` columns (text, or TRL's conversational message lists)."""
    subset: str | None = None
    """Hub dataset configuration name, if any."""
    train_limit: int | None = Field(None, ge=1)
    """Use at most this many training pairs."""
    eval_split: str = "test"
    """Held-out split the before/after figures are measured on (hub preference sets have train/test)."""
    eval_limit: int | None = Field(200, ge=1)
    """Held-out pairs for the figures in summary.json."""
    max_length: int = Field(256, ge=16)
    """Tokens of prompt + reply: the reward trainer drops longer training pairs, DPO truncates them."""


def check_scaling(optim: OptimSettings, scaling: ScalingSettings) -> None:
    """Validation shared by the reward and DPO configs."""
    check_batch(optim, scaling)
    if scaling.sharding == "fsdp":
        raise ValueError("scaling.sharding: TRL's trainers run DDP here (every worker a full replica); "
                         "accelerate enables FSDP only on GPUs")


class RolloutSettings(FrozenConfig):
    """The pool of rollout actors."""

    engine: Literal["vllm", "transformers"] = "vllm"
    """Inference engine in each rollout actor (the same engine interface as serving)."""
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, ge=0)
    gpus_per_worker: float = Field(0, ge=0)
    max_model_len: int = Field(512, ge=16)
    cpu_kv_cache_gib: float = Field(1.0, gt=0)


class SamplingSettings(FrozenConfig):
    """How responses are sampled during rollouts."""

    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; PPO's ratio assumes the policy's own distribution, so 1.0 by default."""
    top_k: int = Field(0, ge=0)
    max_tokens: int = Field(24, ge=1)
    """Longest response; responses also end at the end-of-sequence token, so lengths vary."""


LOGPROB_TOLERANCE = {"float32": 1e-2, "float16": 5e-2, "bfloat16": 1e-1}
"""Default ``ppo.logprob_tolerance`` by dtype: float32 runs here differ by ~1e-5 and a stale adapter by
~0.1-1; bf16 kernels (vLLM's and torch's) round differently, ~1e-2 on average."""


class RewardActorSettings(FrozenConfig):
    """The reward model's Ray actor: its resources (a GPU of its own on GPU clusters) and dtype."""

    num_cpus: float = Field(0, ge=0)
    """With no CPU and no GPU asked for, the actor runs on rank 0's node (never on a head that does no work)."""
    num_gpus: float = Field(0, ge=0)
    """With a GPU the reward model runs on it (``cuda``); else on the CPU."""
    dtype: DType | None = None
    """Defaults to the run's ``dtype``."""


class PPOSettings(FrozenConfig):
    iterations: int = Field(10, ge=1)
    """Rollout → score → learn → sync rounds."""
    prompts_per_iteration: int = Field(32, ge=1)
    epochs: int = Field(2, ge=1)
    """Passes over each iteration's rollouts."""
    minibatch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    clip: float = Field(0.2, gt=0)
    value_clip: float = Field(0.2, gt=0)
    value_coef: float = Field(0.1, ge=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_coef: float = Field(0.05, ge=0)
    """Initial weight of the per-token KL penalty against the reference policy."""
    kl_target: float = Field(2.0, gt=0)
    """KL (nats per response) the adaptive coefficient steers towards."""
    kl_horizon: int = Field(1000, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    micro_batch_size: int | None = Field(None, ge=1)
    """Sequences per forward (and backward) pass on each worker: the scoring pass over the rollouts and
    each minibatch's update go through in parts of this many, gradients accumulated, so only one part's
    logits and activations are held at a time. The update is the same as in one pass; unset: whole
    minibatches (and the whole rollout batch when scoring) at once."""
    log_samples: int = Field(0, ge=0)
    """Write this many of each iteration's rollouts to ``samples.jsonl``: the prompt text and the response text
    exactly as the reward model scored them, the response's token ids and the reward."""
    logprob_tolerance: float | None = Field(None, gt=0)
    """Stop when the engine's and the trainer's log-probabilities of the sampled tokens differ more
    than this on average: the rollout engine is not running the weights being trained. Default by
    ``dtype`` (:data:`LOGPROB_TOLERANCE`): two correct implementations differ more in bf16 than in
    float32. The difference is logged every iteration (``logprob_abs_diff``) either way."""
    save_every: int = Field(2, ge=1)
    """Iterations between checkpoints."""
    seed: int = 0


class RLHFConfig(FrozenConfig):
    """PPO on a LoRA policy (``python -m train_jobs.rlhf --config FILE``)."""

    policy_model: str
    """The SFT model the policy's adapter is trained on; with the adapter off it is the reference."""
    reward_model: str
    """The reward job's ``model/`` folder."""
    prompts: str = "synthetic:preferences"
    """Dataset whose ``prompt`` column holds the user turns to respond to."""
    prompt_limit: int | None = Field(None, ge=1)
    output_dir: str = "artifacts/rlhf/ppo"
    storage_path: str | None = None
    run_name: str = "rlhf"
    dtype: DType = "float32"
    """Weights of the policy and reference in the trainer and in the rollout engines (float32 on CPU;
    bfloat16 on GPUs: vLLM's CUDA LoRA kernels take only 16-bit); the value head stays float32."""
    trust_remote_code: bool = False
    """Run the Python code the policy or reward model ships (``auto_map`` in its config), in the trainer,
    the rollout engines and the reward actor. Off by default: only for models you trust."""
    lora: LoraSettings = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"])
    rollout: RolloutSettings = RolloutSettings()
    reward_actor: RewardActorSettings = RewardActorSettings()
    sampling: SamplingSettings = SamplingSettings()
    ppo: PPOSettings = PPOSettings()
    scaling: ScalingSettings = ScalingSettings()
    tracking: TrackingSettings = TrackingSettings()

    @model_validator(mode="after")
    def _check(self) -> "RLHFConfig":
        if self.lora.dropout != 0:
            raise ValueError("lora.dropout: must be 0 for PPO (the engine's and the trainer's log-probabilities "
                             "must come from the same deterministic policy)")
        if self.ppo.prompts_per_iteration % self.scaling.num_workers:
            raise ValueError("ppo.prompts_per_iteration must be a multiple of scaling.num_workers")
        if self.scaling.use_gpu and self.dtype == "float32":
            raise ValueError("dtype: float32 on GPUs is refused (vLLM's CUDA LoRA kernels take float16/bfloat16 "
                             "only, and a 7B policy does not fit in float32): use bfloat16")
        return self

    @property
    def logprob_tolerance(self) -> float:
        return self.ppo.logprob_tolerance or LOGPROB_TOLERANCE[self.dtype]

    @property
    def reward_dtype(self) -> str:
        return self.reward_actor.dtype or self.dtype


class PreferenceJobConfig(FrozenConfig):
    """What the reward-model and DPO runs share: TRL's trainers on preference pairs in Ray Train workers."""

    model: str
    dtype: DType = "float32"
    """Dtype of the weights (float32 on CPU; bfloat16 on GPUs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory for large models, more compute (the
    Trainer's own ``gradient_checkpointing``, non-reentrant)."""
    trust_remote_code: bool = False
    """Run the Python code a model ships (``auto_map`` in its config) to build it and its tokenizer.
    Off by default: only for models you trust."""
    data: PreferenceData = PreferenceData()
    output_dir: str
    storage_path: str | None = None
    """Ray Train checkpoints and run state (folder or URI); defaults to OUTPUT_DIR/ray."""
    run_name: str
    """Name of the run under storage_path; a rerun with the same name resumes from its last checkpoint."""
    optim: OptimSettings
    scaling: ScalingSettings = ScalingSettings()
    tracking: TrackingSettings = TrackingSettings()

    CHECKPOINT_KEYS: ClassVar[set[str]] = {"model", "dtype", "data", "lora", "optim"}

    @model_validator(mode="after")
    def _check(self):
        check_scaling(self.optim, self.scaling)
        return self

    def training_settings(self) -> dict:
        """What a checkpoint depends on (not where outputs go or how many workers)."""
        return self.model_dump(mode="json", include=self.CHECKPOINT_KEYS)


class RewardJobConfig(PreferenceJobConfig):
    """A reward-model run (``python -m train_jobs.reward_model --config FILE``)."""

    model: str
    """Checkpoint the classifier starts from (a local folder or a hub id): the SFT model, or a base."""
    lora: LoraSettings | None = None
    """Train low-rank adapters (and the score head) instead of every weight, for models too large to
    train whole; they are merged into model/ at the end, so model/ is a plain classifier either way."""
    output_dir: str = "artifacts/rlhf/reward"
    """Where metrics.jsonl, summary.json and model/ go: a folder or an s3://, gs:// URI."""
    run_name: str = "reward"
    optim: OptimSettings = OptimSettings(learning_rate=1e-3, warmup_ratio=0.0, max_steps=60)


class DPOJobConfig(PreferenceJobConfig):
    """A DPO run (``python -m train_jobs.dpo --config FILE``)."""

    model: str
    """The policy's base (usually the SFT model); with the adapter off it is also the reference."""
    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL constraint towards the reference (higher: stay closer)."""
    lora: LoraSettings = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj",
                                                                                   "down_proj"])
    output_dir: str = "artifacts/rlhf/dpo"
    """Where metrics.jsonl, summary.json and adapter/ go: a folder or an s3://, gs:// URI."""
    run_name: str = "dpo"
    optim: OptimSettings = OptimSettings(learning_rate=1e-3, warmup_ratio=0.0, max_steps=40)

    CHECKPOINT_KEYS: ClassVar[set[str]] = {"model", "dtype", "data", "beta", "lora", "optim"}
