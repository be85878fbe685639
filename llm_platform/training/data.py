"""Records to training examples: TRL's dataset formats, then token ids with a loss mask.

Every source ends up in one of the formats TRL and the hub use, with TRL's column names:

- ``{"text": str}``: language modelling, every token carries loss;
- ``{"prompt": str, "completion": str}`` or the same with lists of ``{"role", "content"}`` messages
  (conversational), rendered with the model's chat template; loss on the completion;
- ``{"messages": [...]}``: a multi-turn conversation (``system`` turns included); loss on the assistant turns.

``data.columns`` maps other column names onto these; ``data.loss_on: all`` trains on every token. The
built-in tasks are expressed in the same formats: sentiment and dialogsum records become string pairs
through one of their instruction phrasings (FLAN-style: a training record gets one at random, held-out
records cycle through them deterministically), the chat tasks become conversational pairs.

Tokenization follows TRL's SFTTrainer (``trl/trainer/sft_trainer.py``, ``_prepare_dataset``): a
conversational pair is the rendered prompt (with the generation prompt) and the rendered prompt +
completion, the completion starting where the two token sequences diverge (``common_prefix_length``);
assistant turns are masked with the tokenizer's ``return_assistant_tokens_mask`` when the chat template
has ``{% generation %}`` markers, or TRL's training version of a known template
(``get_training_chat_template``). For other templates (the tiny models', Llama-2's), which TRL cannot
patch, each assistant turn is found the same way TRL finds a completion: render the conversation up to
the turn with the generation prompt and up to the end of the turn, and mark the tokens between.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import datasets
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.data_utils import common_prefix_length, is_conversational, maybe_convert_to_chatml

from llm_platform.data.loader import COLUMNS, available_splits, data_file, is_split_file, load_records
from llm_platform.data.templates import SENTIMENT_TEMPLATES, SUMMARY_TEMPLATES, PromptPair, sentiment_pair, summary_pair
from llm_platform.errors import DataError
from llm_platform.training.config import DataSettings

Example = dict
"""One record in a standard format: ``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages"}``."""


@dataclass(frozen=True)
class Task:
    columns: tuple[str, ...]
    to_pair: callable
    phrasings: int
    labels: tuple[str, ...] = ()
    """Completions of a labelled task: held-out accuracy ranks these."""
    chat: bool = False
    """Pairs are conversations: the prompt a user turn, the completion the assistant's reply."""


def chat_pair(record: dict, template: int | None = None, rng: random.Random | None = None) -> PromptPair:
    """A preference pair's prompt and its preferred reply: instruction tuning before RLHF."""
    return PromptPair(record["prompt"], record["chosen"])


def unfiltered_chat_pair(record: dict, template: int | None = None, rng: random.Random | None = None) -> PromptPair:
    """Either reply of a preference pair: demonstrations nobody filtered, polite or curt. SFT on these
    gives a policy that RLHF can still improve, which is the course's point of the reward model."""
    index = template if template is not None else (rng or random).randrange(2)
    return PromptPair(record["prompt"], (record["chosen"], record["rejected"])[index % 2])


TASKS = {
    "sentiment": Task(COLUMNS["sentiment"], sentiment_pair, len(SENTIMENT_TEMPLATES), (" positive", " negative")),
    "dialogsum": Task(COLUMNS["dialogsum"], summary_pair, len(SUMMARY_TEMPLATES)),
    "chat": Task(("prompt", "chosen"), chat_pair, 1, chat=True),
    "chat_unfiltered": Task(("prompt", "chosen", "rejected"), unfiltered_chat_pair, 2, chat=True),
}
FORMATS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",)}


def task_labels(data: DataSettings) -> tuple[str, ...]:
    task = data.resolved_task
    return TASKS[task].labels if task else ()


# ---------------------------------------------------------------------------------------------- loading


def load_examples(data: DataSettings, split: str, seed: int = 0) -> list[Example]:
    """The examples of ``split`` (train, validation or test) in a standard format, checked row by row."""
    return load_split(data, split, seed)[0]


def load_split(data: DataSettings, split: str, seed: int = 0) -> tuple[list[Example], str, list[int]]:
    """:func:`load_examples`, with the file they come from and each one's row number in it (for errors)."""
    limit = data.train_limit if split == "train" else data.eval_limit
    task = data.resolved_task
    records, where, rows = _split_records(data, split, TASKS[task].columns if task else ())
    if limit is not None:
        records, rows = records.select(range(min(limit, len(records)))), rows[:limit]
    if task:
        return _task_examples(TASKS[task], records, split, seed), where, rows
    return to_standard(records, data, where, rows), where, rows


def _split_records(data: DataSettings, split: str,
                   columns: tuple[str, ...]) -> tuple[datasets.Dataset, str, list[int]]:
    """Records of ``split``, the file (or source) they came from and their row numbers there (from 1). The
    held-out rows of a single file are an ``eval_fraction`` of its rows picked with a fixed seed (files are
    often sorted by topic), and the training split is the rest, so they never repeat a training row."""
    source = data.source
    if split != "train" and data.eval_source:
        source, wanted = data.eval_source, split
        if not is_split_file(source) and available_splits(source) is not None:
            held = [s for s in ("validation", "test") if s in available_splits(source)]
            wanted = split if split in held else (held or ["train"])[0]
        records = load_records(source, wanted, subset=data.subset, columns=columns)
        return records, data_file(source, wanted), list(range(1, len(records) + 1))
    splits = available_splits(source)
    carve = is_split_file(source) or (splits is not None and "validation" not in splits and "test" not in splits)
    if not carve:
        wanted = split
        if splits is not None and split not in splits:  # a folder with validation but no test, or the reverse
            wanted = "validation" if split == "test" else "test"
        records = load_records(source, wanted, subset=data.subset, columns=columns)
        return records, data_file(source, wanted), list(range(1, len(records) + 1))
    records = load_records(source, "train", subset=data.subset, columns=columns)
    held_out = max(1, round(data.eval_fraction * len(records)))
    if len(records) <= held_out:
        raise DataError(f"{data_file(source, 'train')} has {len(records)} row(s): too few to hold out "
                        f"{data.eval_fraction:.0%} for validation; add rows or set data.eval_source")
    held = set(random.Random(0).sample(range(len(records)), held_out))
    indices = [i for i in range(len(records)) if (i in held) != (split == "train")]
    return records.select(indices), data_file(source, "train"), [i + 1 for i in indices]


def _task_examples(task: Task, records: datasets.Dataset, split: str, seed: int) -> list[Example]:
    rng = random.Random(seed)
    if split == "train":
        pairs = [task.to_pair(record, rng=rng) for record in records]
    else:
        pairs = [task.to_pair(record, template=i % task.phrasings) for i, record in enumerate(records)]
    if task.chat:
        return [{"prompt": [{"role": "user", "content": p.prompt}],
                 "completion": [{"role": "assistant", "content": p.completion}]} for p in pairs]
    return [{"prompt": p.prompt, "completion": p.completion} for p in pairs]


def to_standard(records: datasets.Dataset, data: DataSettings, where: str,
                rows: list[int] | None = None) -> list[Example]:
    """Map ``data.columns``, detect the format, and check every row; errors name the file, row and column."""
    have = list(records.column_names)
    missing = {std: col for std, col in data.columns.items() if col not in have}
    if missing:
        raise DataError(f"{where}: data.columns maps " + ", ".join(f"{s} -> {c!r}" for s, c in missing.items())
                        + f", but it has no such column; its columns are {have}")
    renamed = {col: std for std, col in data.columns.items() if col != std}
    clashes = [std for std in renamed.values() if std in have and std not in data.columns.values()]
    if clashes:
        records = records.remove_columns(clashes)  # the mapped column replaces a same-named one
    records = records.rename_columns(renamed)
    fmt = _detect_format(records.column_names, data.format, where)
    examples = records.select_columns(list(FORMATS[fmt]) if fmt != "sharegpt" else ["conversations"]).to_list()
    if fmt == "sharegpt":  # ShareGPT's from/value turns -> TRL's messages (TRL's own converter)
        examples = [_sharegpt_roles(maybe_convert_to_chatml(e)) if e.get("conversations") else {"messages": None}
                    for e in examples]
        fmt = "messages"
    for number, example in zip(rows or range(1, len(examples) + 1), examples):
        problem = _row_problem(example, fmt, data.loss_on)
        if problem:
            raise DataError(f"{where}, row {number}: {problem}")
    return examples


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def _sharegpt_roles(example: dict) -> dict:
    """ShareGPT's ``human``/``gpt`` speakers as chat roles: TRL's converter renames the keys only."""
    for message in example["messages"]:
        if isinstance(message, dict) and message.get("role") in SHAREGPT_ROLES:
            message["role"] = SHAREGPT_ROLES[message["role"]]
    return example


def _detect_format(columns: list[str], fmt: str, where: str) -> str:
    if fmt == "auto":
        if "messages" in columns:
            return "messages"
        if "prompt" in columns and "completion" in columns:
            return "prompt_completion"
        if "text" in columns:
            return "text"
        if "conversations" in columns:
            return "sharegpt"
        raise DataError(f"{where}: cannot tell the dataset format from its columns {columns}: expected `text`, "
                        "`prompt` + `completion` or `messages`; map other names with data.columns, e.g. "
                        "data.columns={prompt: question, completion: answer}")
    lacking = [c for c in FORMATS[fmt] if c not in columns]
    if lacking:
        raise DataError(f"{where}: data.format={fmt} needs column(s) {lacking}; it has {columns} "
                        "(map other names with data.columns)")
    return fmt


def _row_problem(row: dict, fmt: str, loss_on: str) -> str | None:
    """What is wrong with one row, or None. Hand-written: TRL's utilities assume well-formed rows and fail
    with a KeyError or a template error deep inside tokenization, without saying which row."""
    if fmt == "text":
        return _text_problem(row.get("text"), "text")
    if fmt == "messages":
        problem = _messages_problem(row.get("messages"), "messages")
        if problem:
            return problem
        if loss_on == "completion" and not any(m["role"] == "assistant" for m in row["messages"]):
            return "messages has no assistant turn, so nothing would carry loss (or set data.loss_on=all)"
        return None
    prompt, completion = row.get("prompt"), row.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            return f"column {name!r} is missing or null"
    if isinstance(prompt, list) or isinstance(completion, list):
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            kinds = {k: "a list of messages" if isinstance(v, list) else type(v).__name__
                     for k, v in (("prompt", prompt), ("completion", completion))}
            return (f"prompt is {kinds['prompt']} but completion is {kinds['completion']}: give both as strings "
                    "or both as lists of {role, content} messages")
        return _messages_problem(prompt, "prompt") or _messages_problem(completion, "completion")
    return _text_problem(prompt, "prompt") or _text_problem(completion, "completion")


def _text_problem(value, name: str) -> str | None:
    if value is None:
        return f"column {name!r} is missing or null"
    if not isinstance(value, str):
        return f"{name!r} must be a string, got {type(value).__name__} {str(value)[:60]!r}"
    if not value.strip():
        return f"{name!r} is empty"
    return None


def _messages_problem(messages, name: str) -> str | None:
    if messages is None:
        return f"column {name!r} is missing or null"
    if not isinstance(messages, list) or not messages:
        return f"{name!r} must be a non-empty list of {{role, content}} messages, got {str(messages)[:80]!r}"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"{name}[{i}] must be a {{role, content}} message, got {str(message)[:80]!r}"
        if not isinstance(message.get("content"), str):
            return f"{name}[{i}] ({message['role']}): content must be a string, got {message.get('content')!r}"
    return None


# ------------------------------------------------------------------------------------------ tokenizing


def tokenize_pair(pair: PromptPair, tokenizer, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` of prompt + completion + EOS and a ``completion_mask`` of the tokens that carry loss.
    The two strings are tokenized apart, so rank classification (``choice_accuracy``) scores exactly the
    label's tokens after the same prompt tokens."""
    # A chat-template prompt already starts with the BOS token; do not add a second one.
    prompt = tokenizer(pair.prompt, add_special_tokens=not pair.prompt.startswith(tokenizer.bos_token or "\0")).input_ids
    completion = tokenizer(pair.completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = (prompt + completion)[-max_length:]  # keep the completion when truncating: it is what is learnt
    mask = ([0] * len(prompt) + [1] * len(completion))[-max_length:]
    return {"input_ids": ids, "completion_mask": mask}


def tokenize_example(example: Example, tokenizer, max_length: int, loss_on: str = "completion") -> dict[str, list[int]]:
    """``input_ids`` and ``completion_mask`` (1 where a token carries loss) of one standard-format example."""
    if "text" in example:  # language modelling: every token, EOS appended as TRL does
        ids = (tokenizer(example["text"]).input_ids + [tokenizer.eos_token_id])[:max_length]
        return {"input_ids": ids, "completion_mask": [1] * len(ids)}
    if "messages" in example:
        ids, mask = assistant_mask(tokenizer, example["messages"])
        if loss_on == "all":
            mask = [1] * len(ids)
        return {"input_ids": ids[:max_length], "completion_mask": mask[:max_length]}
    if is_conversational(example):
        out = _conversational_pair(tokenizer, example["prompt"], example["completion"])
        out = {k: v[-max_length:] for k, v in out.items()}
    else:
        out = tokenize_pair(PromptPair(example["prompt"], example["completion"]), tokenizer, max_length)
    if loss_on == "all":
        out["completion_mask"] = [1] * len(out["input_ids"])
    return out


def _chat_ids(tokenizer, messages: list[dict], **kwargs) -> dict:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)


def _conversational_pair(tokenizer, prompt: list[dict], completion: list[dict]) -> dict[str, list[int]]:
    """As SFTTrainer tokenizes a conversational prompt/completion pair."""
    continue_final = prompt[-1]["role"] == "assistant"
    prompt_ids = list(_chat_ids(tokenizer, prompt, add_generation_prompt=not continue_final,
                                continue_final_message=continue_final)["input_ids"])
    ids = list(_chat_ids(tokenizer, prompt + completion)["input_ids"])
    start = common_prefix_length(prompt_ids, ids)
    return {"input_ids": ids, "completion_mask": [0] * start + [1] * (len(ids) - start)}


@lru_cache(maxsize=8)
def _masking_template(chat_template: str, tokenizer) -> str | None:
    """The template whose ``{% generation %}`` markers give assistant masks, or None where there is none
    (then :func:`assistant_mask` diffs renders)."""
    if has_generation_markers(chat_template):
        return chat_template
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:  # TRL has no training version of this template
        return None


def assistant_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a mask that is 1 exactly on the assistant turns' tokens
    (content and the template's end-of-turn tokens), 0 on system/user turns and role headers."""
    template = tokenizer.chat_template
    masking = _masking_template(template, tokenizer) if isinstance(template, str) else None
    if masking is not None:
        out = _chat_ids(tokenizer, messages, chat_template=masking, return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    ids = list(_chat_ids(tokenizer, messages)["input_ids"])
    mask = [0] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = list(_chat_ids(tokenizer, messages[:turn], add_generation_prompt=True)["input_ids"]) if turn else []
        through = list(_chat_ids(tokenizer, messages[:turn + 1])["input_ids"])
        if through != ids[:len(through)]:
            raise DataError("the chat template renders a conversation's beginning differently from the whole "
                            "conversation, so assistant turns cannot be located; use a template with "
                            "{% generation %} markers, or data.loss_on=all")
        for i in range(common_prefix_length(before, through), len(through)):
            mask[i] = 1
    return ids, mask


def tokenize_all(examples: list[Example], tokenizer, max_length: int, loss_on: str, where: str,
                 rows: list[int] | None = None) -> list[dict]:
    """Every example tokenized; examples left with no loss token by truncation are dropped, and said so.
    ``rows`` are the examples' row numbers in ``where``, for errors."""
    out, empty = [], []
    for number, example in zip(rows or range(1, len(examples) + 1), examples):
        try:
            tokens = tokenize_example(example, tokenizer, max_length, loss_on)
        except DataError as exc:
            raise DataError(f"{where}, row {number}: {exc}") from None
        except Exception as exc:  # a template that refuses a role order, a bad message: name the row
            raise DataError(f"{where}, row {number}: cannot render it with the chat template: "
                            f"{type(exc).__name__}: {exc}") from None
        if sum(tokens["completion_mask"][1:]) == 0:  # the first token is never a target
            empty.append(number)
            continue
        out.append(tokens)
    if empty:
        print(f"{where}: dropped {len(empty)} example(s) with no loss token left after truncation to "
              f"data.max_length={max_length} (rows {empty[:10]}{'...' if len(empty) > 10 else ''})", flush=True)
    if not out:
        raise DataError(f"{where}: no example has a token that carries loss (data.max_length={max_length})")
    return out

