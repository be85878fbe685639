"""One engine interface over vLLM and transformers; which one runs is a config choice."""

import importlib.util

from llm_platform.engine.protocol import (AdapterRef, Chunk, Choice, Engine, EngineConfig, Result,
                                          SamplingParams)


def build_engine(config: EngineConfig) -> Engine:
    """The engine ``config.kind`` names, loaded and ready for requests."""
    if config.kind == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError("engine kind 'vllm' needs vLLM: install the project with the [cpu] or [gpu] "
                               "extra, or set kind: transformers")
        from llm_platform.engine.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    from llm_platform.engine.hf_engine import TransformersEngine

    return TransformersEngine(config)


__all__ = ["AdapterRef", "Chunk", "Choice", "Engine", "EngineConfig", "Result", "SamplingParams", "build_engine"]
