"""PPO pieces against hand computations, and the stale-weights check against a real vLLM engine."""

from __future__ import annotations

import pytest
import torch

from llm_platform.alignment import ppo


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.4
    d1 = 0.0 + gamma * 0.4 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.5
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert returns[0, :3].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4])


def test_shaped_rewards_put_the_score_on_the_last_response_token():
    logprobs, ref = torch.tensor([[0.0, -1.0, -2.0, 0.0]]), torch.tensor([[0.0, -1.5, -1.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    rewards, kl = ppo.shaped_rewards(torch.tensor([3.0]), logprobs, ref, mask, kl_coef=0.1)
    assert kl[0].tolist() == pytest.approx([0.0, 0.5, -1.0, 0.0])
    assert rewards[0].tolist() == pytest.approx([0.0, -0.05, 0.1 + 3.0, 0.0])


def test_clipped_policy_loss_ignores_ratios_beyond_the_clip():
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    adv = torch.ones(1, 2)
    far = ppo.ppo_losses(torch.full((1, 2), 1.0), old, adv, torch.zeros(1, 2), torch.zeros(1, 2),
                         torch.zeros(1, 2), mask, clip=0.2, value_clip=0.2)
    assert float(far["policy_loss"]) == pytest.approx(-1.2)  # gains beyond 1 + clip are not rewarded
    assert float(far["clip_fraction"]) == 1.0


def test_adaptive_kl_coefficient_moves_towards_the_target():
    control = ppo.AdaptiveKL(0.1, target=2.0, horizon=100)
    control.update(kl=8.0, n_samples=10)
    assert control.value == pytest.approx(0.1 * 1.02)
    control.update(kl=0.0, n_samples=10)
    assert control.value < 0.1 * 1.02


@pytest.mark.slow
def test_stale_weights_are_detected_against_real_vllm_logprobs(tiny_models, engines, loop, tmp_path):
    from peft import LoraConfig, get_peft_model

    from llm_platform.alignment.rollout import Sample, chat_prompt_ids
    from llm_platform.alignment.config import RLHFConfig
    from llm_platform.engine import SamplingParams
    from llm_platform.models.loading import load_causal_lm, load_tokenizer
    from llm_platform.training.distributed import WorkerContext
    from llm_platform.alignment.rlhf_job import StaleWeightsError, _learn, verify_sync

    base = str(tiny_models["tiny-s"])
    tokenizer = load_tokenizer(base)
    engine = engines("tiny-s", "vllm")
    params = SamplingParams(temperature=1.0, max_tokens=12, logprobs=0, seed=3)
    samples = []
    for text in ["Any advice on tea?", "How can I get better at running?", "Can you help me with plants?"]:
        result = loop.run(engine.generate(chat_prompt_ids(tokenizer, text), params))
        choice = result.choices[0]
        samples.append(Sample(result.prompt_token_ids, choice.token_ids, choice.logprobs, choice.text))
    cfg = RLHFConfig(policy_model=base, reward_model=str(tmp_path))

    def learn(init_lora_weights: bool) -> dict:
        torch.manual_seed(0)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=init_lora_weights)
        model = ppo.PolicyWithValue(get_peft_model(load_causal_lm(base), lora))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        return _learn(cfg, model, model, optimizer, ppo.AdaptiveKL(0.05, 2.0, 100), samples,
                      torch.tensor([1.0, -1.0, 0.5]), tokenizer.pad_token_id, WorkerContext())

    same = learn(init_lora_weights=True)  # a fresh adapter is the identity: the weights vLLM sampled from
    assert same["logprob_abs_diff"] < 1e-4
    verify_sync({"iteration": 1, **same}, tolerance=1e-2)
    other = learn(init_lora_weights=False)  # random adapter weights that vLLM never saw
    assert other["logprob_abs_diff"] > 1e-2
    with pytest.raises(StaleWeightsError, match="not sampling from the weights being trained"):
        verify_sync({"iteration": 1, **other}, tolerance=1e-2)


def test_rollout_engines_get_a_lora_slot_rank_vllm_accepts():
    from vllm.config.lora import LoRAConfig

    from llm_platform.alignment.rlhf_job import lora_slot_rank
    from llm_platform.errors import PlatformError

    for rank in (1, 4, 8, 12, 16, 40, 64, 100, 512):
        slot = lora_slot_rank(rank)
        assert slot >= rank
        assert LoRAConfig(max_lora_rank=slot).max_lora_rank == slot  # vLLM's own validation accepts it
    with pytest.raises(PlatformError, match="up to 512"):
        lora_slot_rank(513)


def test_the_value_head_follows_the_policy_device_and_stays_float32(tiny_models):
    """A GPU worker's policy is on ``cuda``: the value head must be created there too (it was left on the
    CPU). Checked here with the policy on the meta device, which no CPU default can pass for."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_models["tiny-s"])
    with torch.device("meta"):
        policy = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = ppo.PolicyWithValue(policy)
    assert model.value_head.weight.device.type == "meta" and model.value_head.weight.dtype == torch.float32


def test_a_bfloat16_ppo_update_runs_on_cpu(tiny_models):
    """The GPU configs' dtype through the PPO update (forward, log-probability check, backward, step),
    on the CPU where torch supports bf16: finite figures, the check passes its bf16 tolerance, LoRA moves."""
    import math

    from peft import LoraConfig, TaskType, get_peft_model

    from llm_platform.alignment.config import RLHFConfig
    from llm_platform.alignment.rlhf_job import _learn
    from llm_platform.alignment.rollout import Sample
    from llm_platform.models.loading import load_causal_lm, load_tokenizer
    from llm_platform.training.distributed import WorkerContext

    cfg = RLHFConfig(policy_model=str(tiny_models["tiny-s"]), reward_model="unused", dtype="bfloat16",
                     ppo={"minibatch_size": 2, "epochs": 1, "prompts_per_iteration": 2})
    torch.manual_seed(0)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=["q_proj", "v_proj"])
    model = ppo.PolicyWithValue(get_peft_model(load_causal_lm(cfg.policy_model, dtype=cfg.dtype), lora))
    tokenizer = load_tokenizer(cfg.policy_model)
    samples = []
    for text in ("Hello there", "How are you today?"):
        prompt = tokenizer(text).input_ids
        ids = model.policy.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=True,
                                    pad_token_id=tokenizer.pad_token_id)
        response = ids[0, len(prompt):].tolist()
        with torch.no_grad():
            logits, _ = model(ids, torch.ones_like(ids))
        logprobs = ppo.token_logprobs(logits, ids)[0, len(prompt) - 1:len(prompt) - 1 + len(response)].tolist()
        samples.append(Sample(prompt, response, logprobs, ""))
    trainable = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    # The frozen base in bf16; PEFT keeps the adapter's own weights in float32 (its default
    # autocast_adapter_dtype), so small updates are not rounded away.
    assert {p.dtype for k, p in model.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    stats = _learn(cfg, model, model, optimizer, ppo.AdaptiveKL(0.05, 2.0, 100), samples, torch.tensor([1.0, -1.0]),
                   tokenizer.pad_token_id, WorkerContext())
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert stats["logprob_abs_diff"] < cfg.logprob_tolerance
    moved = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(trainable[k], v)]
    assert any("lora" in k for k in moved) and any("value_head" in k for k in moved)


def test_micro_batches_make_the_same_ppo_update_one_part_at_a_time(tiny_models):
    """One PPO update (scoring pass, an epoch of two minibatches) with ``ppo.micro_batch_size=1`` leaves the
    same weights as whole minibatches, and no forward pass sees more than one sequence, each cut to its own
    length."""
    import random

    from llm_platform.alignment.config import RLHFConfig
    from llm_platform.alignment.rlhf_job import _learn, build_policy
    from llm_platform.alignment.rollout import Sample
    from llm_platform.training.distributed import WorkerContext

    rng = random.Random(0)
    samples = [Sample([rng.randrange(4, 1000) for _ in range(p)], [rng.randrange(4, 1000) for _ in range(r)],
                      [-1.0] * r, "") for p, r in ((5, 7), (9, 3), (4, 12), (6, 6))]
    scores = torch.tensor([1.0, -0.5, 0.25, 2.0])

    def update(micro_batch_size):
        cfg = RLHFConfig(policy_model=str(tiny_models["tiny-s"]), reward_model="unused",
                         ppo={"minibatch_size": 2, "epochs": 1, "prompts_per_iteration": 4,
                              "micro_batch_size": micro_batch_size, "learning_rate": 0.5})
        torch.manual_seed(0)
        model, tokenizer = build_policy(cfg)
        widths = []
        model.policy.register_forward_pre_hook(lambda module, args, kwargs: widths.append(
            tuple(kwargs["input_ids"].shape)), with_kwargs=True)
        # Plain SGD: the weights move by the gradients themselves (Adam's first steps move every weight by
        # about the learning rate, whatever its gradient, hiding a gradient that is wrong but of the right sign).
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.ppo.learning_rate)
        stats = _learn(cfg, model, model, optimizer, ppo.AdaptiveKL(0.05, 2.0, 100), samples, scores,
                       tokenizer.pad_token_id, WorkerContext())
        return stats, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}, widths

    whole, whole_weights, whole_shapes = update(None)
    micro, micro_weights, micro_shapes = update(1)
    assert {s[0] for s in whole_shapes} == {4, 2} and {s[0] for s in micro_shapes} == {1}
    assert {s[1] for s in micro_shapes} == {len(s.prompt_ids) + len(s.response_ids) for s in samples}
    assert micro == pytest.approx(whole, rel=1e-4, abs=1e-6)
    for name, value in whole_weights.items():
        assert torch.allclose(micro_weights[name], value, atol=1e-6, rtol=1e-4), name
    # The value head starts at zero: how far it moved shows the update was not a no-op.
    assert float(whole_weights["value_head.weight"].abs().max()) > 1e-3


def test_the_value_head_reads_the_last_hidden_state_without_keeping_the_others(tiny_models):
    from peft import LoraConfig, get_peft_model

    from llm_platform.models.loading import load_causal_lm

    torch.manual_seed(0)
    model = ppo.PolicyWithValue(get_peft_model(load_causal_lm(str(tiny_models["tiny-s"])),
                                               LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False)))
    torch.nn.init.normal_(model.value_head.weight)
    ids = torch.tensor([[1, 5, 9, 11, 3], [1, 7, 8, 3, 3]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    seen = []
    model.policy.register_forward_hook(lambda module, args, kwargs, out: seen.append(out.hidden_states),
                                       with_kwargs=True)
    logits, values = model(ids, attention)
    assert seen == [None]  # the policy was not asked for every layer's hidden states
    full = model.policy(input_ids=ids, attention_mask=attention, output_hidden_states=True)
    assert torch.allclose(values, model.value_head(full.hidden_states[-1]).squeeze(-1), atol=1e-6)
    assert torch.allclose(logits, full.logits, atol=1e-6)
