"""Reward-model scoring, the same way in training, evaluation and the PPO reward actor.

A reward model is a sequence classifier with one output, trained on preference pairs with
the Bradley-Terry loss (``-log sigmoid(r_chosen - r_rejected)``). A prompt and a response
are scored as the chat the model saw in training: the user turn, then the assistant turn,
rendered with the tokenizer's chat template. Bradley-Terry fixes rewards only up to a
constant, so after training the mean reward over the training set is stored as
``reward_offset`` in the model's config and subtracted here: rewards average 0.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from llm_platform.models.loading import load_tokenizer, resolve_model


def conversation(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


class RewardScorer:
    """``RewardScorer(path).score(prompts, responses) -> list[float]`` (normalised rewards)."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 32):
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model(path)).to(device).eval()
        self._setup(model, load_tokenizer(path), getattr(model.config, "reward_offset", 0.0), batch_size)

    @classmethod
    def from_model(cls, model, tokenizer: PreTrainedTokenizerBase, offset: float = 0.0,
                   batch_size: int = 32) -> "RewardScorer":
        scorer = cls.__new__(cls)
        scorer._setup(model, tokenizer, offset, batch_size)
        return scorer

    def _setup(self, model, tokenizer, offset: float, batch_size: int) -> None:
        self.model, self.tokenizer, self.offset, self.batch_size = model, tokenizer, offset, batch_size
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        texts = [self.tokenizer.apply_chat_template(conversation(p, r), tokenize=False)
                 for p, r in zip(prompts, responses)]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(device)
            scores += (self.model(**batch).logits[:, 0].float() - self.offset).tolist()
        self.model.train(was_training)
        return scores

    def pair_accuracy(self, records) -> tuple[float, float]:
        """Share of pairs ranked right, and the mean chosen-minus-rejected margin."""
        chosen = self.score(list(records["prompt"]), list(records["chosen"]))
        rejected = self.score(list(records["prompt"]), list(records["rejected"]))
        margins = [c - r for c, r in zip(chosen, rejected)]
        return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)
