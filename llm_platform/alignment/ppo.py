"""PPO for language models, the pieces: policy with a value head, per-token KL-shaped rewards,
GAE advantages, clipped losses, and the adaptive KL coefficient.

The policy is a LoRA adapter on the SFT model; the reference policy is the *same* model
with the adapter switched off, so no second copy is held. Rewards follow Ziegler et al.
(2019) / InstructGPT: every response token pays ``-kl_coef * (log pi - log pi_ref)`` and the
last token also gets the reward model's score; the KL coefficient adapts so the measured
KL tracks a target, which is what keeps the policy from drifting into reward hacking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class PolicyWithValue(torch.nn.Module):
    """A PEFT causal LM plus a scalar value head on its last hidden state."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        # On the policy's device (a GPU worker's, not the CPU), in float32 whatever the policy's dtype.
        self.value_head = torch.nn.Linear(policy.config.hidden_size, 1, device=policy.device, dtype=torch.float32)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        values = self.value_head(out.hidden_states[-1].float()).squeeze(-1)
        return out.logits.float(), values

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self.policy.disable_adapter():
            return self.policy(input_ids=input_ids, attention_mask=attention_mask).logits.float()


@dataclass
class Batch:
    """Padded prompt+response sequences; ``mask`` marks the response tokens (those the policy chose)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor

    @staticmethod
    def build(samples, pad_id: int, device) -> "Batch":
        width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
        ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        mask = torch.zeros_like(ids, dtype=torch.float)
        for row, s in enumerate(samples):
            seq = s.prompt_ids + s.response_ids
            ids[row, :len(seq)] = torch.tensor(seq)
            attention[row, :len(seq)] = 1
            mask[row, len(s.prompt_ids):len(seq)] = 1
        return Batch(ids.to(device), attention.to(device), mask[:, 1:].to(device))


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..T-1 (aligned with ``Batch.mask``)."""
    return -F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    return -(logp.exp() * logp).sum(-1)


def shaped_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (KL penalty everywhere, the score on each response's last token) and the KL."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.cumsum(-1).argmax(-1)  # index of the last response token in each row
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimates and returns over the response tokens (masked positions skipped)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(m > 0, delta + gamma * lam * running, running)
        next_value = torch.where(m > 0, values[:, t], next_value)
        advantages[:, t] = running * m
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = (x * mask).sum() / mask.sum()
    var = (((x - mean) * mask) ** 2).sum() / mask.sum()
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, clip: float,
               value_clip: float) -> dict[str, torch.Tensor]:
    """Clipped surrogate policy loss and clipped value loss (PPO, Schulman et al. 2017)."""
    ratio = torch.exp(logprobs - old_logprobs)
    policy = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    value = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    return {"policy_loss": masked_mean(policy, mask), "value_loss": masked_mean(value, mask),
            "clip_fraction": masked_mean(((ratio - 1).abs() > clip).float(), mask)}


class AdaptiveKL:
    """The KL coefficient moves so the measured KL tracks ``target`` (Ziegler et al. 2019)."""

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        error = max(min(kl / self.target - 1, 0.2), -0.2)
        self.value *= 1 + error * n_samples / self.horizon
