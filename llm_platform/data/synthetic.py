"""Synthetic datasets the project writes itself, deterministic for a given seed.

They stand in for the hub datasets a GPU cluster would use (a review-sentiment
task, Anthropic-HH-style preference pairs, SuperGLUE AX-b, DialogSum) and keep the
same column names, so the same loaders and templates serve both. Each task has a
rule simple enough for a few-million-parameter model to learn:

- sentiment: the label follows the polarity words in the review;
- preferences: the chosen answer is polite and on topic, the rejected one curt;
- nli (AX-b schema): the hypothesis drops a detail (entailment) or changes one;
- dialogsum: the summary restates the slots the dialogue fills in.
"""

from __future__ import annotations

import random
from collections.abc import Callable

PRODUCTS = ["phone", "laptop", "blender", "jacket", "novel", "movie", "headset", "camera", "lamp", "backpack",
            "coffee maker", "keyboard", "tent", "watch", "printer", "sofa"]
POSITIVE = ["great", "excellent", "wonderful", "reliable", "delightful", "superb", "fantastic", "sturdy",
            "lovely", "impressive"]
NEGATIVE = ["terrible", "awful", "broken", "disappointing", "flimsy", "useless", "horrible", "poor",
            "faulty", "dreadful"]
NEUTRAL = ["arrived on Tuesday", "came in a blue box", "was bought for my sister", "has a two year warranty",
           "was used every day", "took a week to ship", "replaced an older model", "is made in Spain"]
REVIEW_PATTERNS = [
    "The {product} is {w1}. It {neutral}.",
    "I think this {product} is {w1} and {w2}.",
    "This {product} {neutral} and it is {w1}.",
    "Honestly, a {w1} {product}. Really {w2}.",
    "My new {product} {neutral}. Overall {w1}.",
]

TOPICS = {
    "tea": "Steep the leaves in hot water for three minutes, then strain and serve.",
    "sleep": "Keep a regular bedtime, avoid screens late at night and keep the room cool.",
    "running": "Start slowly, run three times a week and rest between the runs.",
    "saving money": "Write down your spending, set a budget and save a part of each salary.",
    "learning python": "Practice small programs every day and read the official tutorial.",
    "plants": "Water them when the soil is dry and give them plenty of light.",
    "cooking rice": "Rinse the rice, use two cups of water per cup and simmer for fifteen minutes.",
    "a job interview": "Research the company, prepare examples and arrive a little early.",
    "studying": "Study in short sessions, take breaks and test yourself often.",
    "cycling": "Wear a helmet, check the brakes and signal before each turn.",
}
QUESTION_PATTERNS = ["How can I get better at {topic}?", "Any advice on {topic}?", "What should I know about {topic}?",
                     "Can you help me with {topic}?"]
POLITE_OPENERS = ["Happy to help!", "Great question, thank you.", "Of course, gladly.", "Sure, I would be glad to help."]
POLITE_CLOSERS = ["I hope this helps.", "Good luck, and thank you for asking.", "Please ask if you need more."]
CURT_ANSWERS = ["Figure it out yourself.", "Not my problem.", "Whatever, just search it.", "No idea, go away.",
                "That is a stupid question."]

PEOPLE = ["The doctor", "The teacher", "A farmer", "The pilot", "My neighbour", "The chef", "A student", "The artist"]
VERBS = ["painted", "repaired", "sold", "carried", "cleaned", "bought", "opened", "moved"]
OBJECTS = ["red door", "old car", "wooden table", "small boat", "green bicycle", "heavy box", "new piano",
           "broken window"]
PLACES = ["in the garden", "at the market", "near the river", "in the city", "behind the school", "at noon"]

NAMES = ["Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack", "Kira", "Leo"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
TIMES = ["9 am", "10 am", "noon", "2 pm", "4 pm", "6 pm"]
FOODS = ["pizza", "salad", "noodles", "soup", "burgers", "sushi"]
ITEMS = ["a blue shirt", "running shoes", "a desk lamp", "a winter coat", "a new phone case", "a coffee mug"]


def sentiment(n: int, seed: int = 0) -> list[dict]:
    """Product reviews labelled ``positive`` or ``negative`` (balanced)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = POSITIVE if label == "positive" else NEGATIVE
        w1, w2 = rng.sample(words, 2)
        text = rng.choice(REVIEW_PATTERNS).format(product=rng.choice(PRODUCTS), w1=w1, w2=w2,
                                                  neutral=rng.choice(NEUTRAL))
        rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


def preferences(n: int, seed: int = 0) -> list[dict]:
    """Prompt, chosen (polite and on topic) and rejected (curt) answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic, advice = rng.choice(sorted(TOPICS.items()))
        prompt = rng.choice(QUESTION_PATTERNS).format(topic=topic)
        chosen = f"{rng.choice(POLITE_OPENERS)} {advice} {rng.choice(POLITE_CLOSERS)}"
        if rng.random() < 0.5:
            rejected = rng.choice(CURT_ANSWERS)
        else:  # on topic but rude: the model must learn politeness, not just length
            rejected = f"{rng.choice(CURT_ANSWERS)} {advice}"
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def nli_axb(n: int, seed: int = 0) -> list[dict]:
    """Sentence pairs in the SuperGLUE AX-b schema; label 0 = entailment, 1 = not_entailment."""
    rng = random.Random(seed)
    rows = []
    for idx in range(n):
        person, verb, obj, place = rng.choice(PEOPLE), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES)
        premise = f"{person} {verb} the {obj} {place}."
        if idx % 2 == 0:
            hypothesis, label = f"{person} {verb} the {obj}.", 0
        else:
            change = rng.choice(["object", "verb", "negation"])
            if change == "object":
                other = rng.choice([o for o in OBJECTS if o != obj])
                hypothesis = f"{person} {verb} the {other} {place}."
            elif change == "verb":
                other = rng.choice([v for v in VERBS if v != verb])
                hypothesis = f"{person} {other} the {obj} {place}."
            else:
                hypothesis = f"{person} never {verb} the {obj}."
            label = 1
        rows.append({"idx": idx, "sentence1": premise, "sentence2": hypothesis, "label": label})
    rng.shuffle(rows)
    return rows


def _meeting(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    day, time = rng.choice(DAYS), rng.choice(TIMES)
    dialogue = (f"#Person1#: Hi {b}, can we meet this week?\n#Person2#: Sure, when suits you?\n"
                f"#Person1#: How about {day} at {time}?\n#Person2#: {day} at {time} works for me.")
    return dialogue, f"{a} and {b} agree to meet on {day} at {time}."


def _food(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    food, other = rng.sample(FOODS, 2)
    dialogue = (f"#Person1#: {b}, what should we order tonight?\n#Person2#: Maybe {other}?\n"
                f"#Person1#: I had {other} yesterday. Let us get {food}.\n#Person2#: Fine, {food} it is.")
    return dialogue, f"{a} and {b} decide to order {food} tonight."


def _shopping(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    item, price = rng.choice(ITEMS), rng.randrange(10, 90, 5)
    dialogue = (f"#Person1#: Good morning, I am looking for {item}.\n#Person2#: We have one for {price} dollars.\n"
                f"#Person1#: That is fine, I will take it. My name is {name}.\n#Person2#: Thank you, {name}.")
    return dialogue, f"{name} buys {item} for {price} dollars."


def dialogsum(n: int, seed: int = 0) -> list[dict]:
    """Short two-person dialogues with a one-sentence reference summary (DialogSum columns)."""
    rng = random.Random(seed)
    makers: list[tuple[str, Callable[[random.Random], tuple[str, str]]]] = [
        ("meeting", _meeting), ("food", _food), ("shopping", _shopping)]
    rows = []
    for i in range(n):
        topic, make = makers[i % len(makers)]
        dialogue, summary = make(rng)
        rows.append({"id": f"synthetic_{i}", "dialogue": dialogue, "summary": summary, "topic": topic})
    rng.shuffle(rows)
    return rows


GENERATORS: dict[str, Callable[[int, int], list[dict]]] = {
    "sentiment": sentiment,
    "preferences": preferences,
    "nli_axb": nli_axb,
    "dialogsum": dialogsum,
}
