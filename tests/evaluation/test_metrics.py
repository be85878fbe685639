"""ROUGE, BLEU and accuracy against figures worked out by hand."""

import math

import pytest

from llm_platform.evaluation.metrics import accuracy, bleu, rouge


def test_rouge_on_a_hand_worked_pair():
    reference, prediction = "The cat sat on the mat.", "the cat lay on a mat"
    # Unigrams (lower-cased, punctuation dropped): reference the cat sat on the mat (6), prediction
    # the cat lay on a mat (6). Clipped overlap: the, cat, on, mat = 4, so P = R = 4/6 and F = 2/3.
    # Bigrams: 5 each, shared "the cat" only: F = 1/5. Longest common subsequence: the cat on mat = 4: F = 2/3.
    scores = rouge([prediction], [reference])
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(1 / 5)
    assert scores["rougeL"] == pytest.approx(2 / 3)
    # Averaged over pairs: with an exact match beside it, ROUGE-1 is (2/3 + 1) / 2.
    assert rouge([prediction, "a dog"], [reference, "A dog."])["rouge1"] == pytest.approx(5 / 6)


def test_bleu_on_a_hand_worked_pair():
    reference, prediction = "the cat sat on the mat", "the cat sat on the red mat"
    # n-gram precisions of the 7-token prediction: 1-grams 6/7, 2-grams 4/6 (the cat, cat sat, sat on,
    # on the), 3-grams 3/5, 4-grams 2/4. It is longer than the reference, so no brevity penalty.
    expected = 100 * math.exp(sum(math.log(p) for p in (6 / 7, 4 / 6, 3 / 5, 2 / 4)) / 4)
    assert bleu([prediction], [reference]) == pytest.approx(expected, abs=1e-6)
    assert bleu([reference], [reference]) == pytest.approx(100)


def test_accuracy_and_bad_input():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no examples"):
        rouge([], [])
