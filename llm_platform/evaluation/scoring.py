"""Rank classification: the answer a model finds most likely after the prompt is its prediction.

Classification tasks here (NLI True/False, sentiment positive/negative) are scored by comparing
the log-probability of each candidate answer after the prompt, as T0 and the FLAN evaluations do,
rather than by parsing generated text: small or untrained models rarely generate a label word
verbatim, but their preference between the candidates is always defined, so accuracy measures
what the model knows rather than how well it follows an output format.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm_platform.models.loading import load_causal_lm, load_tokenizer


class LabelScorer:
    """A transformers model (optionally with a PEFT adapter) that scores candidate answers."""

    def __init__(self, model: str, adapter: str | None = None, device: str = "cpu"):
        self.tokenizer = load_tokenizer(model)
        self.model = load_causal_lm(model, device=device)
        # Prompt tuning prepends virtual tokens whose logits come back with the rest: skipped when reading.
        self.virtual_tokens = 0
        if adapter is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter).eval()
            peft_config = self.model.active_peft_config
            if peft_config.is_prompt_learning:
                self.virtual_tokens = peft_config.num_virtual_tokens

    def candidate_logprobs(self, prompt: str, candidates: Sequence[str]) -> list[float]:
        """Sum of the log-probabilities of each candidate's tokens, following ``prompt``.

        Candidates are tokenized on their own (no BOS) and appended to the prompt's ids, which on
        a byte-level BPE is what tokenizing the joined text gives when the candidate starts with
        a space. All candidates go through the model in one right-padded batch.
        """
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        answers = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in candidates]
        sequences = [prompt_ids + answer for answer in answers]
        width = max(map(len, sequences))
        pad = self.tokenizer.pad_token_id
        device = self.model.get_input_embeddings().weight.device
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, self.virtual_tokens:]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        start = len(prompt_ids)
        # The token at position t is predicted by the logits at position t - 1.
        return [sum(float(logprobs[row, start + i - 1, token]) for i, token in enumerate(answer))
                for row, answer in enumerate(answers)]

    def classify(self, prompt: str, candidates: Sequence[str]) -> int:
        """Index of the most likely candidate."""
        scores = self.candidate_logprobs(prompt, candidates)
        return max(range(len(scores)), key=scores.__getitem__)
