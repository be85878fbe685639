"""Reward-model scoring, the same way in training, evaluation and the PPO reward actor.

A reward model is a sequence classifier with one output (``num_labels=1``), trained on preference
pairs with the Bradley-Terry loss ``-log sigmoid(r(chosen) - r(rejected))``. A prompt and a response
are scored as the conversation the model saw in training: the user turn then the assistant turn,
rendered with the tokenizer's chat template and tokenized exactly as TRL's RewardTrainer does; the
reward is the score at the last token.

Bradley-Terry fixes rewards only up to a constant. After training, the reward job stores the mean
training-set reward as ``reward_offset`` in the model's ``config.json`` (Llama's score head has no
bias to fold it into) and this scorer subtracts it, so rewards average 0 over the training set.
A bare ``AutoModelForSequenceClassification`` on the same folder returns the raw, uncentred scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from llm_platform.alignment.preferences import Turns, assistant_turns, chat_ids, user_turns
from llm_platform.models.loading import load_sequence_classifier, load_tokenizer

OFFSET_KEY = "reward_offset"


class RewardScorer:
    """``RewardScorer(path, device).score(prompts, responses) -> list[float]``: centred rewards."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 32, dtype: str = "float32",
                 trust_remote_code: bool = False):
        model = load_sequence_classifier(path, dtype, device, trust_remote_code=trust_remote_code)
        self._setup(model.eval(), load_tokenizer(path, trust_remote_code=trust_remote_code),
                    getattr(model.config, OFFSET_KEY, 0.0), batch_size)

    @classmethod
    def from_model(cls, model, tokenizer: PreTrainedTokenizerBase, offset: float = 0.0,
                   batch_size: int = 32) -> "RewardScorer":
        """A scorer on a model in memory (the reward job scores with the model it just trained)."""
        scorer = cls.__new__(cls)
        scorer._setup(model, tokenizer, offset, batch_size)
        return scorer

    def _setup(self, model, tokenizer, offset: float, batch_size: int) -> None:
        self.model, self.tokenizer, self.offset, self.batch_size = model, tokenizer, offset, batch_size
        if model.config.pad_token_id is None:  # the classifier finds each sequence's last token by its padding
            model.config.pad_token_id = tokenizer.pad_token_id

    def token_ids(self, prompt: Turns, response: Turns) -> list[int]:
        """The tokens a (prompt, response) pair is scored on: the chat-rendered user + assistant turns."""
        return chat_ids(self.tokenizer, user_turns(prompt) + assistant_turns(response))

    @torch.no_grad()
    def score(self, prompts: Sequence[Turns], responses: Sequence[Turns]) -> list[float]:
        """One reward per (prompt, response): texts (a user turn, an assistant turn) or message lists."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        scores: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            ids = [self.token_ids(p, r) for p, r in zip(prompts[i:i + self.batch_size],
                                                         responses[i:i + self.batch_size])]
            batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            scores += (logits[:, 0].float() - self.offset).tolist()
        self.model.train(was_training)
        return scores

    def score_pairs(self, records) -> tuple[list[float], list[float]]:
        """Rewards of the chosen and of the rejected reply of each preference pair."""
        prompts = list(records["prompt"])
        return self.score(prompts, list(records["chosen"])), self.score(prompts, list(records["rejected"]))

    def pair_accuracy(self, records) -> tuple[float, float]:
        """Share of pairs ranked right (reward(chosen) > reward(rejected)), and the mean margin."""
        return ranking(*self.score_pairs(records))


def ranking(chosen: Sequence[float], rejected: Sequence[float]) -> tuple[float, float]:
    """Share of pairs with chosen > rejected, and the mean chosen-minus-rejected margin."""
    margins = [c - r for c, r in zip(chosen, rejected)]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)
