"""Real chat template families (Llama-2, Llama-3, ChatML/Qwen) through the chain: SFT's loss mask on multi-turn
conversations, the reward and DPO trainers' tokenization of conversational pairs, then one real chain per family,
each stage started from the previous job's output: SFT on multi-turn ``messages`` → reward model on conversational
pairs → PPO → the PPO policy served over HTTP and chatted with through the OpenAI client. The models are tiny-s
built with each family's template and special tokens (``family_models``)."""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

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


# -- one chain per family: SFT -> reward model -> PPO -> serving chat over HTTP ----------------------------------
# Tiny budgets: the point is each family's template handled end to end by the real jobs, not what they learn.
# Only SFT gets enough steps (40, a few seconds) to learn the conversations' shape, so that the served policy's
# replies end on the family's end-of-turn token by themselves.

TOPICS = ["saving money", "cooking", "running", "tea", "gardening", "reading", "sleep", "painting", "music", "travel"]


def chat_rows(n: int, seed: int) -> list[dict]:
    """Multi-turn conversations with a system prompt: two polite, short assistant replies each."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        first, second = rng.sample(TOPICS, 2)
        rows.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Can you help me with {first}?"},
            {"role": "assistant", "content": f"Happy to help with {first}."},
            {"role": "user", "content": f"And with {second}?"},
            {"role": "assistant", "content": f"Of course, gladly. {second.capitalize()} too."}]})
    return rows


def pair_rows(n: int, seed: int) -> list[dict]:
    """Conversational preference pairs (TRL's explicit-prompt form): a multi-turn prompt with a system turn, a
    polite reply chosen over a curt one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        first, second = rng.sample(TOPICS, 2)
        rows.append({"prompt": [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": f"Can you help me with {first}?"},
                                {"role": "assistant", "content": f"Happy to help with {first}."},
                                {"role": "user", "content": f"And with {second}?"}],
                     "chosen": [{"role": "assistant", "content": f"Of course, gladly. {second.capitalize()} too."}],
                     "rejected": [{"role": "assistant", "content": rng.choice(["No.", "Figure it out yourself."])}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


PPO_PROMPTS = ["Can you help me with saving money?", "  How do I start running?\n", "What tea should I buy?",
               "Any advice on cooking rice?"]  # the second keeps surrounding whitespace: carried, not re-parsed


@dataclass
class Chain:
    root: Path
    sft: dict
    reward: dict
    ppo: dict


def run_sft(name: str, base: Path, root: Path) -> dict:
    """The chain's first job, SFT on multi-turn ``messages``; writes the later jobs' data beside it."""
    from llm_platform.config import load_config
    from llm_platform.training import sft_job
    from llm_platform.training.config import SFTConfig
    from tests.alignment.conftest import CONFIGS

    chats = write_jsonl(root / "data" / "chats.jsonl", chat_rows(160, seed=0))
    write_jsonl(root / "data" / "pairs" / "train.jsonl", pair_rows(64, seed=1))
    write_jsonl(root / "data" / "pairs" / "test.jsonl", pair_rows(16, seed=2))
    write_jsonl(root / "data" / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS])
    return sft_job.main(load_config(SFTConfig, CONFIGS / "local_sft_chat.yaml", [
        f"model={base}", f"output_dir={root / 'sft'}", f"run_name=sft-{name}", f"data.source={chats}", "data.task=null",
        "data.eval_limit=16", "optim.max_steps=40", "optim.log_every=10", "optim.save_every=0", *QUIET]))


def run_reward_and_ppo(name: str, root: Path, sft: Future, ppo_turn: threading.Lock) -> Chain:
    """The chain's other jobs, as a user runs them, each started from the ``output`` of the previous job's summary.
    ``ppo_turn`` is held for the PPO job: a PPO run takes its two CPUs one at a time (its trainer's, then its
    rollout actor's), so two at once on the session's two-CPU cluster could each hold one and wait for ever."""
    from llm_platform.alignment import reward_job, rlhf_job
    from llm_platform.alignment.config import RLHFConfig
    from llm_platform.config import load_config
    from tests.alignment.conftest import CONFIGS

    sft = sft.result()
    reward = reward_job.main(load_config(reward_job.RewardJobConfig, CONFIGS / "local_reward.yaml", [
        f"model={sft['output']}", f"output_dir={root / 'reward'}", f"run_name=reward-{name}",
        f"data.source={root / 'data' / 'pairs'}", "optim.max_steps=4", "optim.log_every=2", "optim.save_every=0",
        *QUIET]))
    with ppo_turn:
        ppo = rlhf_job.main(load_config(RLHFConfig, CONFIGS / "local_rlhf.yaml", [
            f"policy_model={sft['output']}", f"reward_model={reward['output']}", f"output_dir={root / 'ppo'}",
            f"run_name=ppo-{name}", f"prompts={root / 'data' / 'prompts.jsonl'}", "rollout.engine=transformers",
            "ppo.iterations=1", "ppo.prompts_per_iteration=4", "ppo.minibatch_size=4", "ppo.epochs=1",
            "ppo.log_samples=4", "sampling.max_tokens=12", "ppo.save_every=1", *QUIET]))
    return Chain(root, sft, reward, ppo)


QUIET = ["tracking.report_to=[]"]


@dataclass
class Chains:
    jobs: dict[str, Future]
    server: Future | None
    """The family server (:func:`family_server`), spawned once the three SFT models exist; None when no test that
    is run needs it."""

    def __call__(self, name: str) -> Chain:
        return self.jobs[name].result()


def family_server(sft_models: dict[str, str], root: Path):
    """One `llmp serve` for the three families, spawned (not yet ready): each family's SFT model as a base, its id
    the family's name."""
    from tests.serving.conftest import ADMIN_KEY, API_KEY, Server

    config = {"adapter_store": str(root / "store"), "adapter_sources": [str(root.parent)],
              "models": [{"id": name, "num_cpus": 0.5, "max_adapters": 1,
                          "engine": {"model": model, "kind": "vllm", "max_model_len": 256,
                                     "cpu_kv_cache_gib": 0.25, "enable_soft_prompts": False, "max_loras": 1,
                                     "max_lora_rank": 8}}
                         for name, model in sft_models.items()]}
    server = Server(config, root, env={"LLMP_ADMIN_KEY": ADMIN_KEY, "LLMP_API_KEY": API_KEY})
    server.spawn()
    return server


@pytest.fixture(scope="module")
def chains(request, ray_local, family_models, tmp_path_factory):
    """``chains(family)``: that family's chain. The three start with the first test that asks: the three SFT jobs
    first, two at a time (as tests/training/conftest.two_at_a_time), then each family's reward and PPO jobs. The
    SFT models are the family server's bases: when a served test is among those run, the server is spawned as soon
    as they exist and starts while the reward and PPO jobs run (131-137 s for three models here, alone)."""
    ppo_turn = threading.Lock()
    roots = {name: tmp_path_factory.mktemp(f"chain-{name}") for name in CHAT_FAMILIES}
    serve = any("policy_server" in item.fixturenames for item in request.session.items)
    with ThreadPoolExecutor(2, thread_name_prefix="job") as pool, ThreadPoolExecutor(1) as spawner:
        sfts = {name: pool.submit(run_sft, name, family_models[name], root) for name, root in roots.items()}
        jobs = {name: pool.submit(run_reward_and_ppo, name, root, sfts[name], ppo_turn) for name, root in roots.items()}
        server = spawner.submit(lambda: family_server({name: f.result()["output"] for name, f in sfts.items()},
                                                      tmp_path_factory.mktemp("family-server"))) if serve else None
        try:
            yield Chains(jobs, server)
        finally:
            if server is not None and server.exception() is None and server.result().process.poll() is None:
                server.result().stop()  # when policy_server did not run


def stop_tokens(model: Path) -> list[int]:
    eos = json.loads((Path(model) / "generation_config.json").read_text())["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]  # Llama-2 has one stop token, given as an int


@pytest.mark.slow
@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_chain_sft_reward_ppo_on_the_family_template(chains, family_models, name):
    """SFT on multi-turn ``messages`` → the reward model trained from the SFT model on conversational pairs → PPO
    from the SFT model with that reward model. PPO's samples.jsonl holds what the reward actor was given: each
    prompt is the dataset's text exactly and each response the decoded tokens the policy sampled, with no template
    markup, and the logged reward is the reward model's score of exactly that pair."""
    import yaml

    from llm_platform.alignment.reward import RewardScorer

    chain, family = chains(name), FAMILIES[name]
    sft_model, reward_model = Path(chain.sft["output"]), Path(chain.reward["output"])
    assert chain.sft["eval_loss"] < chain.sft["eval_loss_before"] / 2  # the conversations were learnt
    tokenizer = AutoTokenizer.from_pretrained(sft_model)  # the SFT model carries the family's template and stops
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(family_models[name]).chat_template
    assert stop_tokens(sft_model) == stop_tokens(family_models[name])
    assert yaml.safe_load((chain.root / "reward" / "config.yaml").read_text())["model"] == str(sft_model)
    ppo_config = yaml.safe_load((chain.root / "ppo" / "config.yaml").read_text())
    assert (ppo_config["policy_model"], ppo_config["reward_model"]) == (str(sft_model), str(reward_model))
    assert chain.reward["eval_examples"] == 16 and chain.ppo["iterations"] == 1
    assert (Path(chain.ppo["output"]) / "adapter_config.json").exists()

    rows = [json.loads(line) for line in (chain.root / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == sorted(PPO_PROMPTS)
    stops = set(stop_tokens(sft_model))
    for r in rows:
        ids = r["response_ids"]
        assert not stops & set(ids[:-1])  # generation stopped at the first end-of-turn/end-of-text token
        # The engine holds back the bytes of a character cut by max_tokens, which decode shows as U+FFFD.
        assert r["response"] == tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
        assert not any(marker in r["response"] for marker in family.markers)
    scorer = RewardScorer(str(reward_model))
    rescored = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert rescored == pytest.approx([r["reward"] for r in rows], abs=1e-4)
    # What the reward model read: the user's text and the response, once each, in the family's turns.
    messages = [{"role": "user", "content": rows[0]["prompt"]}, {"role": "assistant", "content": rows[0]["response"]}]
    assert scorer.token_ids(rows[0]["prompt"], rows[0]["response"]) == list(
        tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


@pytest.fixture(scope="module")
def policy_server(chains):
    """The family server (see ``chains``), once it serves, with each family's PPO adapter registered over the admin
    API as ``FAMILY:ppo``."""
    import httpx

    server = chains.server.result()
    try:
        server.wait_ready(timeout=900)  # from its spawn, while the reward and PPO jobs ran beside it
        for name in CHAT_FAMILIES:
            answer = httpx.post(f"{server.url}/v1/adapters", headers=server.admin(), timeout=60, json={
                "name": "ppo", "base": name, "kind": "lora", "source": chains(name).ppo["output"]})
            assert answer.status_code == 201, answer.text
        yield server
    finally:
        server.stop()


def greedy_reference(chain: Chain, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The PPO policy (SFT model + the PPO job's adapter) decoding greedily in transformers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(chain.sft["output"])
    model = PeftModel.from_pretrained(base, chain.ppo["output"]).eval()
    pad = AutoTokenizer.from_pretrained(chain.sft["output"]).pad_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=stop_tokens(Path(chain.sft["output"])), pad_token_id=pad)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_served_ppo_policy_chats_in_the_family_template_over_http(policy_server, chains, name):
    """The PPO policy behind the OpenAI-compatible endpoint: the chat is rendered with the family's template (the
    system prompt in its markup), the reply is the policy's own greedy reply and ends on the family's end-of-turn
    token by itself, and each stop token in the model's generation config ends a reply; no reply carries markup."""
    import httpx
    from openai import OpenAI

    from tests.serving.conftest import API_KEY

    chain, family = chains(name), FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(chain.sft["output"])
    client = OpenAI(base_url=f"{policy_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    model, messages = f"{name}:ppo", CONVERSATION[:4]
    assert model in [m.id for m in client.models.list().data]

    rendered = httpx.post(f"{policy_server.url}/tokenize", headers=policy_server.user(), timeout=60,
                          json={"model": model, "messages": messages}).json()["tokens"]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(rendered) == expected and family.system.format(SYSTEM) in expected
    assert expected.endswith(family.header.rstrip(" "))

    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    choice, stops = chat.choices[0], stop_tokens(Path(chain.sft["output"]))
    reference = greedy_reference(chain, rendered, 24)
    assert chat.usage.prompt_tokens == len(rendered)
    assert choice.finish_reason == "stop" and reference[-1] in stops, (choice, tokenizer.decode(reference))
    assert choice.message.content == tokenizer.decode(reference, skip_special_tokens=True)
    assert chat.usage.completion_tokens == len(reference) < 24
    assert choice.message.content.strip() and not any(m in choice.message.content for m in family.markers)

    # Each stop token, made likely once 3 tokens are out: the reply must end right there, as a stop.
    for stop in stops:
        forced = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0,
                                                logit_bias={str(stop): 40}, extra_body={"min_tokens": 3})
        assert forced.choices[0].finish_reason == "stop" and forced.usage.completion_tokens <= 4, (stop, forced)
        assert not any(m in forced.choices[0].message.content for m in family.markers)
