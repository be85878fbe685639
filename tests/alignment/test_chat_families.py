"""Real chat template families (Llama-2, Llama-3, ChatML/Qwen) through the chain: SFT's loss mask on multi-turn
conversations, the reward and DPO trainers' tokenization of conversational pairs, the PPO reward hand-off and
serving chat. The models are tiny-s built with each family's template and special tokens (``family_models``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import CHAT_FAMILIES


@dataclass(frozen=True)
class Family:
    system: str
    """How the template writes the system prompt ``{}``."""
    header: str
    """What precedes an assistant reply."""
    reply: str
    """How the template writes an assistant reply ``{}`` (through its end-of-turn text)."""
    markers: tuple[str, ...]
    """Template markup that must never appear in a reply's text."""


# Written from the families' published formats, independently of the templates in llm_platform/models/tiny.py.
FAMILIES = {
    "llama-2": Family("[INST] <<SYS>>\n{}\n<</SYS>>\n\n", " [/INST]", " {} </s>",
                      ("[INST]", "[/INST]", "<<SYS>>", "</s>", "<s>")),
    "llama-3": Family("<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
                      "<|start_header_id|>assistant<|end_header_id|>\n\n", "{}<|eot_id|>",
                      ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>")),
    "chatml": Family("<|im_start|>system\n{}<|im_end|>\n", "<|im_start|>assistant\n", "{}<|im_end|>\n",
                     ("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
}
SYSTEM = "You answer in one short sentence."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Can you help me with saving money?"},
    {"role": "assistant", "content": "Happy to help! Set a budget."},
    {"role": "user", "content": "And with cooking?"},
    {"role": "assistant", "content": "Of course, gladly. Start with rice."},
]


def assistant_spans(text: str, family: Family, messages: list[dict]) -> list[tuple[int, int]]:
    """Character spans of each assistant reply (with its end-of-turn text) in the rendered conversation."""
    spans, cursor = [], 0
    for message in messages:
        if message["role"] != "assistant":
            continue
        piece = family.header + family.reply.format(message["content"])
        start = text.index(piece, cursor) + len(family.header)
        spans.append((start, start + len(piece) - len(family.header)))
        cursor = spans[-1][1]
    return spans


@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_sft_loss_mask_is_exactly_the_assistant_turns(family_models, name):
    from llm_platform.training.data import tokenize_all
    from llm_platform.training.evaluate import IGNORE, collate

    family, tokenizer = FAMILIES[name], AutoTokenizer.from_pretrained(family_models[name])
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert family.system.format(SYSTEM) in text  # the family's own system-prompt markup
    spans = assistant_spans(text, family, CONVERSATION)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    expected = [int(any(a <= lo and hi <= b for a, b in spans)) for lo, hi in encoded["offset_mapping"]]

    example = tokenize_all([{"messages": CONVERSATION}], tokenizer, 512, "completion", "test")[0]
    assert example["input_ids"] == encoded["input_ids"]
    assert example["completion_mask"] == expected, [(tokenizer.decode([i]), m, e) for i, m, e in
                                                    zip(encoded["input_ids"], expected, example["completion_mask"])]
    labels = collate([example], tokenizer.pad_token_id, torch.device("cpu"))["labels"][0].tolist()
    trained = [t for t, label in zip(example["input_ids"], labels) if label != IGNORE]
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert tokenizer.decode(trained) == "".join(family.reply.format(r) for r in replies)
    assert trained.count(tokenizer.eos_token_id) == len(replies)  # each reply ends on the end-of-turn token


@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_reward_and_dpo_trainers_render_pairs_with_the_family_template(family_models, name, tmp_path):
    """TRL's RewardTrainer and DPOTrainer tokenize the pairs as the jobs hand them over; the reward scorer (PPO's
    reward actor, held-out figures) and the DPO margins (reply_tokens) must see the same tokens."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from llm_platform.alignment.preferences import reply_tokens
    from llm_platform.alignment.reward import RewardScorer

    family, path = FAMILIES[name], family_models[name]
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = CONVERSATION[:4]  # system, user, assistant, user: a multi-turn prompt
    chosen = [{"role": "assistant", "content": "Sure, I would be glad to help. Cook rice first."}]
    rejected = [{"role": "assistant", "content": "Figure it out yourself."}]
    pairs = datasets.Dataset.from_list([{"prompt": prompt, "chosen": chosen, "rejected": rejected}] * 2)
    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1, max_length=256,
                  per_device_train_batch_size=2)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert family.system.format(SYSTEM) in prompt_text and prompt_text.endswith(family.header.rstrip(" "))
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids

    dpo = DPOTrainer(AutoModelForCausalLM.from_pretrained(path), args=DPOConfig(**common), train_dataset=pairs,
                     processing_class=tokenizer)
    row = dpo.train_dataset[0]
    assert row["prompt_ids"] == prompt_ids  # the whole rendered prompt is a prefix of prompt + reply
    for reply, ids in ((chosen, row["chosen_ids"]), (rejected, row["rejected_ids"])):
        assert tokenizer.decode(ids) == family.reply.format(reply[0]["content"])
        assert reply_tokens(tokenizer, prompt, reply) == (row["prompt_ids"], ids)

    classifier = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    reward = RewardTrainer(classifier, args=RewardConfig(**common), train_dataset=pairs, processing_class=tokenizer)
    row = reward.train_dataset[0]
    scorer = RewardScorer.from_model(classifier, tokenizer)
    for reply, ids in ((chosen, row["chosen_ids"]), (rejected, row["rejected_ids"])):
        assert ids[:len(prompt_ids)] == prompt_ids
        assert tokenizer.decode(ids[len(prompt_ids):]) == family.reply.format(reply[0]["content"])
        assert scorer.token_ids(prompt, reply) == ids


@pytest.mark.slow
@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_ppo_reward_actor_scores_the_prompt_and_the_policy_response_as_text(ray_local, family_models, name, tmp_path):
    """One PPO iteration per family: samples.jsonl holds what the reward actor was given. Each prompt is
    the dataset's text exactly and each response the decoded tokens the policy sampled, with no template markup,
    and the logged reward is the reward model's score of exactly that pair."""
    from transformers import AutoModelForSequenceClassification

    from llm_platform.alignment import rlhf_job as rlhf
    from llm_platform.alignment.config import RLHFConfig
    from llm_platform.alignment.reward import RewardScorer
    from llm_platform.config import load_config
    from tests.alignment.conftest import CONFIGS

    family, policy = FAMILIES[name], family_models[name]
    tokenizer = AutoTokenizer.from_pretrained(policy)
    reward_path = tmp_path / "reward"
    torch.manual_seed(0)  # a fresh score head: the hand-off is under test, not what the reward model learnt
    AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1).save_pretrained(reward_path)
    tokenizer.save_pretrained(reward_path)
    prompts = ["Can you help me with saving money?", "  How do I start running?\n", "What tea should I buy?",
               "Any advice on cooking rice?"]  # the second keeps surrounding whitespace: carried, not re-parsed
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cfg = load_config(RLHFConfig, CONFIGS / "local_rlhf.yaml", [
        f"policy_model={policy}", f"reward_model={reward_path}", f"output_dir={tmp_path / 'out'}",
        f"prompts={tmp_path / 'prompts.jsonl'}", "rollout.engine=transformers", "ppo.iterations=1",
        "ppo.prompts_per_iteration=4", "ppo.minibatch_size=4", "ppo.epochs=1", "ppo.log_samples=4",
        "sampling.max_tokens=12", "ppo.save_every=1"])
    rlhf.main(cfg)

    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == sorted(prompts)
    eos = json.loads((policy / "generation_config.json").read_text())["eos_token_id"]
    stops = set(eos if isinstance(eos, list) else [eos])  # Llama-2 has one stop token, given as an int
    for r in rows:
        ids = r["response_ids"]
        assert not stops & set(ids[:-1])  # generation stopped at the first end-of-turn/end-of-text token
        assert r["response"] == tokenizer.decode(ids, skip_special_tokens=True)
        assert not any(marker in r["response"] for marker in family.markers)
    scorer = RewardScorer(str(reward_path))
    rescored = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert rescored == pytest.approx([r["reward"] for r in rows], abs=1e-4)
    # What the reward model read: the user's text and the response, once each, in the family's turns.
    messages = [{"role": "user", "content": rows[0]["prompt"]}, {"role": "assistant", "content": rows[0]["response"]}]
    assert scorer.token_ids(rows[0]["prompt"], rows[0]["response"]) == list(
        tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


@pytest.mark.slow
@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_serving_chat_renders_the_family_template_and_stops_at_its_end_of_turn(family_models, loop, name):
    """vLLM behind the serving chat path (the same render_chat the chat endpoint uses): the prompt is the family's
    rendering, and every token in the model's generation config ends a reply; replies carry no template markup."""
    from llm_platform.engine import EngineConfig, SamplingParams, build_engine
    from llm_platform.serving.model_server import render_chat

    family, path = FAMILIES[name], family_models[name]
    stops = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    stops = stops if isinstance(stops, list) else [stops]

    async def start():
        return build_engine(EngineConfig(model=str(path), kind="vllm", max_model_len=256, cpu_kv_cache_gib=0.25))

    engine = loop.run(start())
    try:
        tokenizer = engine.tokenizer
        ids = render_chat(tokenizer, name, CONVERSATION[:4])
        expected = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(ids) == expected and family.system.format(SYSTEM) in expected
        assert expected.endswith(family.header.rstrip(" "))

        async def ask(params):
            return (await engine.generate(ids, params)).choices[0]

        # Each stop token, made likely once 3 tokens are out: the reply must end right there, as a stop.
        for stop in stops:
            choice = loop.run(ask(SamplingParams(temperature=0, max_tokens=20, min_tokens=3,
                                                 logit_bias=((stop, 40.0),))))
            assert choice.finish_reason == "stop" and len(choice.token_ids) <= 4, (stop, choice)
            assert not any(marker in choice.text for marker in family.markers)
        free = loop.run(ask(SamplingParams(temperature=1.0, seed=0, max_tokens=24)))
        assert not any(marker in free.text for marker in family.markers)
        assert not set(stops) & set(free.token_ids[:-1])
    finally:
        engine.shutdown()
