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
        # The value head reads the last hidden state: the output layer's input, taken by a hook, since
        # output_hidden_states=True would also return (and keep) every other layer's hidden states.
        head = self.policy.get_output_embeddings()
        if head is None:
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            return out.logits.float(), self.value_head(out.hidden_states[-1].float()).squeeze(-1)
        last = []
        hook = head.register_forward_hook(lambda module, args, output: last.append(args[0]))
        try:
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            hook.remove()
        return out.logits.float(), self.value_head(last[-1].float()).squeeze(-1)

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

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, rows) -> "Batch":
        """The sequences ``rows`` (a slice or index tensor), cut to their own longest length: right
        padding beyond it changes nothing in a causal model, so a micro-batch of short sequences costs
        only their length. Per-token figures of the whole batch line up with it as ``x[rows, :width - 1]``."""
        attention = self.attention_mask[rows]
        width = int(attention.sum(-1).max())
        return Batch(self.input_ids[rows, :width], attention[:, :width], self.mask[rows, :width - 1])


def row_parts(rows: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    """``rows`` in consecutive parts of at most ``size`` (all at once when ``size`` is None)."""
    return list(rows.split(size)) if size else [rows]


@torch.no_grad()
def rollout_figures(model, core: "PolicyWithValue", batch: Batch, micro_batch_size: int | None):
    """The policy's and the reference's log-probabilities, the values and the summed entropy of the
    response tokens of every sequence in ``batch``, computed ``micro_batch_size`` sequences at a time: only
    one micro-batch's logits (batch x length x vocabulary) and hidden states exist at once."""
    logprobs, refs, values = (torch.zeros(batch.mask.shape, device=batch.mask.device) for _ in range(3))
    entropy_sum = 0.0
    for rows in row_parts(torch.arange(len(batch.input_ids), device=batch.input_ids.device), micro_batch_size):
        part = batch.rows(rows)
        width = part.width - 1
        logits, part_values = model(part.input_ids, part.attention_mask)
        logprobs[rows, :width] = token_logprobs(logits, part.input_ids)
        values[rows, :width] = part_values[:, :-1]
        entropy_sum += float((entropy(logits) * part.mask).sum())
        del logits
        refs[rows, :width] = token_logprobs(core.reference_logits(part.input_ids, part.attention_mask),
                                            part.input_ids)
    return logprobs, refs, values, entropy_sum


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


def masked_mean(x: torch.Tensor, mask: torch.Tensor, tokens: float | None = None) -> torch.Tensor:
    """Mean of ``x`` over the masked tokens; ``tokens``: divide by this count instead (a micro-batch's
    share of the mean over a larger batch, so the shares of all micro-batches add up to that mean)."""
    return (x * mask).sum() / (mask.sum().clamp(min=1) if tokens is None else max(tokens, 1.0))


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, clip: float,
               value_clip: float, tokens: float | None = None) -> dict[str, torch.Tensor]:
    """Clipped surrogate policy loss and clipped value loss (PPO, Schulman et al. 2017), token means over
    ``mask`` (or, with ``tokens``, this micro-batch's share of the means over a minibatch of that many)."""
    ratio = torch.exp(logprobs - old_logprobs)
    policy = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    value = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    return {"policy_loss": masked_mean(policy, mask, tokens), "value_loss": masked_mean(value, mask, tokens),
            "clip_fraction": masked_mean(((ratio - 1).abs() > clip).float(), mask, tokens)}


class AdaptiveKL:
    """The KL coefficient moves so the measured KL tracks ``target`` (Ziegler et al. 2019)."""

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        error = max(min(kl / self.target - 1, 0.2), -0.2)
        self.value *= 1 + error * n_samples / self.horizon
