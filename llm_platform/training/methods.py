"""The four fine-tuning methods, as the model a worker trains.

- ``full``: every weight trains; the output is a complete checkpoint (``model/``).
- ``lora``: low-rank updates on the chosen linear layers; the base is frozen.
- ``qlora``: LoRA on a base quantized to 4 bits by bitsandbytes (NF4), the course's recipe
  for fitting a large model's fine-tuning on one GPU.
- ``prompt_tuning``: only a few virtual-token embeddings train (soft prompts).
The adapter methods save a PEFT folder (``adapter/``) that the serving layer loads.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import BitsAndBytesConfig

from llm_platform.models.loading import DTYPES, load_causal_lm, resolve_model
from llm_platform.training.config import SFTConfig
from llm_platform.training.devices import sft_placement


def build_model(cfg: SFTConfig, device: str = "cpu"):
    """The model to train, with exactly the parameters ``cfg.method`` trains set to require grad."""
    if cfg.method == "qlora":
        model = load_causal_lm(cfg.model, cfg.dtype, device, quantization=quantization_config(cfg),
                               trust_remote_code=cfg.trust_remote_code)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=CHECKPOINTING)
    else:
        # Under FSDP the weights stay float32 (the optimizer's master copy) and FSDP casts each layer to
        # cfg.dtype for compute (distributed.shard's mixed-precision policy); otherwise they are stored in it.
        model = load_causal_lm(cfg.model, str(sft_placement(cfg).dtype), device,
                               trust_remote_code=cfg.trust_remote_code)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
    if cfg.method == "full":
        return model.train()
    # Non-reentrant checkpointing passes gradients to the adapters inside a checkpointed layer even when
    # the layer's input (the frozen embeddings' output) does not require grad, so PEFT's
    # enable_input_require_grads (needed with the reentrant variant) is not.
    return get_peft_model(model, peft_config(cfg)).train()


CHECKPOINTING = {"use_reentrant": False}
"""torch.utils.checkpoint's non-reentrant variant: works with FSDP2, frozen inputs and PEFT."""



def quantization_config(cfg: SFTConfig) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.quant_type,
                              bnb_4bit_use_double_quant=cfg.quant.double_quant,
                              bnb_4bit_compute_dtype=DTYPES[cfg.quant.compute_dtype])


def peft_config(cfg: SFTConfig):
    if cfg.method in ("lora", "qlora"):
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                          lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
    settings = cfg.prompt_tuning
    if settings.init_text:
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=settings.init_text,
                                  tokenizer_name_or_path=resolve_model(cfg.model, weights=False))
    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.num_virtual_tokens)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def load_trained(base: str, output: str, method: str, dtype: str = "float32"):
    """The trained model from a run's output folder (``adapter/`` on the base, or ``model/``)."""
    if method == "full":
        return load_causal_lm(output, dtype)
    return PeftModel.from_pretrained(load_causal_lm(base, dtype), output).eval()
