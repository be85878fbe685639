"""The figures evaluations report: accuracy, ROUGE (rouge-score) and BLEU (sacrebleu).

Thin wrappers so every command computes a metric the same way:
- ROUGE-1/2/L are F-measures averaged over the pairs, with Porter stemming (ROUGE-1.5.5's ``-m``,
  the setting papers report), on a 0-1 scale as rouge-score and Hugging Face ``evaluate`` give them;
- BLEU is corpus-level, as sacrebleu computes it: 0-100, its standard 13a tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    """Share of ``predictions`` equal to their label."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy of no examples is undefined")
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def rouge(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measure of each prediction against its reference."""
    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # rouge-score takes (target, prediction)
        for kind in ROUGE_TYPES:
            totals[kind] += scores[kind].fmeasure
    return {kind: total / len(predictions) for kind, total in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) with one reference per prediction."""
    _check_pairs(predictions, references)
    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("a score over no examples is undefined")
