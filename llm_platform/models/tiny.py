"""The embedded default models: three Llama-architecture checkpoints built locally.

They stand in for a small, a medium and a large hub model on machines without a
GPU or network. Each is a real Hugging Face checkpoint (config, safetensors
weights, byte-level BPE tokenizer with a chat template) that transformers, PEFT,
bitsandbytes and vLLM load as they would a downloaded one. Building is
deterministic: same command, same bytes.

    llmp models build-tiny --out models/
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llm_platform.data import synthetic, templates
from llm_platform.data.loader import synthetic_split

VOCAB_SIZE = 1024
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# One turn per role header, each closed by EOS so generation stops at the end of a reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of one tiny model. head_dim is 64 everywhere: vLLM's CPU attention refuses 16."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


# About 0.5M, 5M and 26M parameters: far enough apart that latency grows visibly with size.
TINY_SPECS = (
    TinySpec("tiny-s", hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=256),
    TinySpec("tiny-m", hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=768),
    TinySpec("tiny-l", hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=1536),
)
TINY_NAMES = tuple(spec.name for spec in TINY_SPECS)


def tokenizer_corpus() -> list[str]:
    """Text the tokenizer is trained on: every synthetic task in its prompt formats, plus chat markup."""
    lines: list[str] = []
    for row in synthetic_split("sentiment", "train"):
        lines.append(templates.sentiment_pair(row, template=len(lines) % len(templates.SENTIMENT_TEMPLATES)).prompt
                     + " " + row["label"])
    for row in synthetic_split("preferences", "train"):
        lines += [row["prompt"], row["chosen"], row["rejected"]]
    for row in synthetic_split("nli_axb", "train"):
        for style in ("zero_shot", "instruction"):
            pair = templates.nli_pair(row, style)
            lines.append(pair.prompt + pair.completion)
    for i, row in enumerate(synthetic_split("dialogsum", "train")):
        pair = templates.summary_pair(row, template=i % len(templates.SUMMARY_TEMPLATES))
        lines.append(pair.prompt + pair.completion)
    lines += [f"{role}\n{text}" for role in ROLE_TOKENS for text in synthetic.POLITE_OPENERS]
    lines += _general_english()
    return lines


def _general_english() -> list[str]:
    """A little everyday prose so the course's free-form prompts tokenize into words, not bytes."""
    return [
        "What do you know about the sun? The sun is a star at the centre of our solar system.",
        "Plan a cake for a party with a small budget. First list the ingredients, then compare prices, "
        "then choose a recipe that uses flour, eggs, sugar, butter and chocolate.",
        "You are a senior developer helping a junior developer find and fix a bug in a web application. "
        "Start by reading the error in the browser console, then check the server logs and the request.",
        "Explain step by step how to answer the question, and think about each step before the next one.",
        "The quick brown fox jumps over the lazy dog while the children play in the park.",
    ]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (no unknown characters) trained on :func:`tokenizer_corpus`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[UNK, BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS, chat_template=CHAT_TEMPLATE, model_max_length=2048,
        padding_side="left")


def build_model(spec: TinySpec, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.hidden_size // spec.num_attention_heads, intermediate_size=spec.intermediate_size,
        max_position_embeddings=2048, tie_word_embeddings=False,
        # Wider than the usual 0.02 so the untrained models' next-token distributions have clear
        # winners: greedy decoding then does not hinge on float rounding, and engines can be compared.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_models(out_dir: str | Path, force: bool = False) -> dict[str, Path]:
    """Write ``out_dir/tiny-{s,m,l}``; existing complete checkpoints are kept unless ``force``."""
    out = Path(out_dir)
    paths = {spec.name: out / spec.name for spec in TINY_SPECS}
    if not force and all((p / "model.safetensors").is_file() and (p / "tokenizer.json").is_file()
                         for p in paths.values()):
        return paths
    tokenizer = build_tokenizer()
    for index, spec in enumerate(TINY_SPECS):
        model = build_model(spec, tokenizer, seed=index)
        tmp = paths[spec.name].with_name(spec.name + ".partial")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if paths[spec.name].exists():
            _remove_tree(paths[spec.name])
        tmp.rename(paths[spec.name])
    return paths


def parameter_count(path: str | Path) -> int:
    """Parameters of a saved checkpoint, read from its config without loading weights."""
    config = LlamaConfig.from_pretrained(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def checkpoint_digest(path: str | Path) -> str:
    """SHA-256 over every file of a checkpoint folder, in name order."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).rglob("*")):
        if file.is_file():
            digest.update(file.relative_to(path).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if child.is_file() else child.rmdir()
    path.rmdir()


def ensure_tiny_model(path: str | Path) -> None:
    """Build the tiny models next to ``path`` if it names a missing one (``.../tiny-m``): the embedded default."""
    path = Path(path).expanduser()
    if path.name in TINY_NAMES and not (path / "config.json").exists():
        build_tiny_models(path.parent)
