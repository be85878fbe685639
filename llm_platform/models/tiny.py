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
from typing import TYPE_CHECKING

from llm_platform.data import synthetic, templates
from llm_platform.data.loader import synthetic_split

if TYPE_CHECKING:  # imported where used: ensure_tiny_model's callers check their inputs before torch costs seconds
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 1024
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# One turn per role header, each closed by EOS so generation stops at the end of a reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# The chat templates of real model families, as their tokenizer_config.json files ship them (the hub cannot
# be reached here, so the strings live in the project). Llama-2-chat (meta-llama/Llama-2-7b-chat-hf): the
# system prompt inside the first user turn between <<SYS>> markers, each user turn in [INST] ... [/INST],
# each reply closed by EOS; [INST] and <<SYS>> are plain text, not special tokens.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Llama-3-Instruct (meta-llama/Meta-Llama-3-8B-Instruct): a header per turn, each turn closed by <|eot_id|>,
# which is the tokenizer's EOS and, with <|end_of_text|>, the generation config's end tokens.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# ChatML as Qwen2-Instruct ships it (Qwen/Qwen2-7B-Instruct): a default system turn, each turn in
# <|im_start|>ROLE ... <|im_end|>; no BOS; <|im_end|> is EOS, <|endoftext|> the padding.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFamily:
    """The chat template and special tokens a tiny model is built with."""

    name: str
    template: str
    bos: str | None
    eos: str
    """The tokenizer's EOS: the end-of-turn token the template closes a reply with."""
    pad: str
    unk: str | None
    extra: tuple[str, ...]
    """Further special tokens (role markers), in vocabulary order after BOS/EOS/PAD."""
    stop: tuple[str, ...]
    """``generation_config.eos_token_id``: every token generation stops at (end of turn, end of text)."""
    markers: tuple[str, ...]
    """Plain-text markup of the template, put into the tokenizer corpus so it tokenizes compactly."""

    @property
    def special_tokens(self) -> list[str]:
        return [t for t in (self.unk, self.bos, self.eos, self.pad) if t] + list(self.extra)


CHAT_FAMILIES = {
    "tiny": ChatFamily("tiny", CHAT_TEMPLATE, BOS, EOS, PAD, UNK, tuple(ROLE_TOKENS), (EOS,), tuple(ROLE_TOKENS)),
    "llama-2": ChatFamily("llama-2", LLAMA2_CHAT_TEMPLATE, BOS, EOS, PAD, UNK, (), (EOS,),
                          ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")),
    "llama-3": ChatFamily("llama-3", LLAMA3_CHAT_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>",
                          "<|finetune_right_pad_id|>", None,
                          ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"),
                          ("<|end_of_text|>", "<|eot_id|>"), ("system", "user", "assistant")),
    "chatml": ChatFamily("chatml", CHATML_CHAT_TEMPLATE, None, "<|im_end|>", "<|endoftext|>", None,
                         ("<|im_start|>",), ("<|im_end|>", "<|endoftext|>"), ("system", "user", "assistant")),
}
"""``llmp models build-tiny --chat-template NAME``: ``tiny`` (the project's own, the default), ``llama-2``,
``llama-3`` and ``chatml`` (Qwen)."""


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


def tokenizer_corpus(family: ChatFamily | None = None) -> list[str]:
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
    family = family or CHAT_FAMILIES["tiny"]
    lines += [f"{marker}\n{text}" for marker in family.markers for text in synthetic.POLITE_OPENERS]
    if family.name != "tiny":  # the tiny family's corpus (and so its bytes) stays as it was
        lines += _rendered_chats(family)
    lines += _general_english()
    return lines


def _rendered_chats(family: ChatFamily, limit: int = 400) -> list[str]:
    """Preference conversations rendered with the family's template, so its plain-text markup and role
    names become tokens of their own. Rendered with jinja2 as transformers renders chat templates
    (sandboxed, trim_blocks, lstrip_blocks): the tokenizer that would render them does not exist yet."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(family.template)
    lines = []
    for i, row in enumerate(synthetic_split("preferences", "train")[:limit]):
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["chosen"]}]
        if i % 2:
            messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        lines.append(template.render(messages=messages, bos_token=family.bos or "", eos_token=family.eos,
                                     add_generation_prompt=False, raise_exception=raise_exception))
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


def chat_family(name: str) -> ChatFamily:
    if name not in CHAT_FAMILIES:
        raise ValueError(f"chat template family {name!r} is not one of {sorted(CHAT_FAMILIES)}")
    return CHAT_FAMILIES[name]


def build_tokenizer(family: str = "tiny") -> PreTrainedTokenizerFast:
    """Byte-level BPE (no unknown characters) trained on :func:`tokenizer_corpus`, with ``family``'s special
    tokens and chat template. A family with a BOS token prepends it, as Llama's tokenizers do; ChatML
    (Qwen) has none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = chat_family(family)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=spec.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(spec), trainer=trainer)
    if spec.bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, tok.token_to_id(spec.bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad, unk_token=spec.unk,
        additional_special_tokens=list(spec.extra), chat_template=spec.template, model_max_length=2048,
        padding_side="left")


def build_model(spec: TinySpec, tokenizer: PreTrainedTokenizerFast, seed: int = 0,
                family: str = "tiny") -> LlamaForCausalLM:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.hidden_size // spec.num_attention_heads, intermediate_size=spec.intermediate_size,
        max_position_embeddings=2048, tie_word_embeddings=False,
        # Wider than the usual 0.02 so the untrained models' next-token distributions have clear
        # winners: greedy decoding then does not hinge on float rounding, and engines can be compared.
        initializer_range=0.1,
        # Without a BOS token (ChatML) the config names the end-of-text token, as Qwen2's does.
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Every token a reply may end with: transformers' generate and vLLM both stop at these.
    stop = [tokenizer.convert_tokens_to_ids(t) for t in chat_family(family).stop]
    model.generation_config.eos_token_id = stop[0] if len(stop) == 1 else stop
    return model


def build_tiny_models(out_dir: str | Path, force: bool = False, chat_template: str = "tiny",
                      sizes: tuple[str, ...] = TINY_NAMES) -> dict[str, Path]:
    """Write ``out_dir/tiny-{s,m,l}`` (or only ``sizes``) with ``chat_template``'s template and special
    tokens (:data:`CHAT_FAMILIES`); existing complete checkpoints are kept unless ``force``."""
    chat_family(chat_template)
    unknown = set(sizes) - set(TINY_NAMES)
    if unknown or not sizes:
        raise ValueError(f"sizes: {sorted(unknown) or 'none given'}; choose from {list(TINY_NAMES)}")
    out = Path(out_dir)
    paths = {spec.name: out / spec.name for spec in TINY_SPECS if spec.name in sizes}
    if not force and all((p / "model.safetensors").is_file() and (p / "tokenizer.json").is_file()
                         for p in paths.values()):
        return paths
    tokenizer = build_tokenizer(chat_template)
    for index, spec in enumerate(TINY_SPECS):
        if spec.name not in paths:
            continue
        model = build_model(spec, tokenizer, seed=index, family=chat_template)
        tmp = paths[spec.name].with_name(spec.name + ".partial")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if paths[spec.name].exists():
            _remove_tree(paths[spec.name])
        tmp.rename(paths[spec.name])
    return paths


def parameter_count(path: str | Path) -> int:
    """Parameters of a saved checkpoint, read from its config without loading weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

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
