"""Routing accuracy on the shipped labelled set, and explanations."""

from __future__ import annotations

import pytest

from p2pedge.orchestrator.catalog import Catalog, UnknownCategory
from p2pedge.orchestrator.classifier import (
    NaiveBayesClassifier,
    accuracy,
    cross_validate,
    default_classifier,
    load_labelled,
    stratified_folds,
)

# Written after the features were fixed and never used to tune them: a true held-out set.
HELD_OUT = [
    ("chat", "Hey! What's a good series to binge this weekend?"),
    ("chat", "I just adopted a kitten, any advice for the first week?"),
    ("chat", "Can you cheer me up a little?"),
    ("chat", "What are your thoughts on learning to paint as an adult?"),
    ("chat", "Suggest a fun activity for a rainy Sunday with kids."),
    ("summarize", "Summarize this article for me: The central bank raised rates again citing..."),
    ("summarize", "tl;dr please: our Q3 roadmap shifts focus from mobile to the web app..."),
    ("summarize", "Give me the key points of these notes: budget approved, hiring frozen..."),
    ("summarize", "Condense this paragraph into one sentence: The festival returns in July..."),
    ("summarize", "Write a brief summary of the following interview transcript: Q: ..."),
    ("translate", "Translate 'where is the nearest pharmacy' into Spanish."),
    ("translate", "How do you say 'nice to meet you' in German?"),
    ("translate", "What does 'bon appétit' mean in English?"),
    ("translate", "Translate this to Japanese: The train leaves at seven."),
    ("translate", "Please translate into Dutch: I would like two tickets."),
    ("explain-code", "What does this Python line do? x = {k: v for k, v in pairs if v}"),
    ("explain-code", "Explain why this C code leaks memory: p = malloc(10); p = NULL;"),
    ("explain-code", "What is the difference between a process and a thread in Java?"),
    ("explain-code", "Explain this git command: git cherry-pick abc123"),
    ("explain-code", "Why does my JavaScript async function return a Promise?"),
    ("math", "What is 48 divided by 6 plus 3?"),
    ("math", "Solve for y: 2y - 4 = 10."),
    ("math", "Calculate the perimeter of a square with side 7."),
    ("math", "What is the derivative of 5x^2?"),
    ("math", "What is 30% of 90?"),
]


def test_labelled_set_is_large_and_balanced() -> None:
    pairs = load_labelled()
    assert len(pairs) >= 100
    counts = {c: sum(1 for _, x in pairs if x == c) for c in Catalog.load().categories}
    assert min(counts.values()) >= 20, counts


def test_cross_validated_accuracy_at_least_90_percent() -> None:
    pairs = load_labelled()
    scores = [cross_validate(pairs, k=5, seed=seed) for seed in range(3)]
    mean = sum(scores) / len(scores)
    print(
        f"5-fold CV accuracy over 3 shuffles: {mean:.3f} ({', '.join(f'{s:.3f}' for s in scores)})"
    )
    assert mean >= 0.90


def test_fresh_held_out_accuracy_at_least_90_percent() -> None:
    acc = accuracy(default_classifier(), [(t, c) for c, t in HELD_OUT])
    print(f"fresh held-out accuracy: {acc:.3f} on {len(HELD_OUT)} requests")
    assert acc >= 0.90


def test_folds_partition_the_set() -> None:
    pairs = load_labelled()
    folds = stratified_folds(pairs, 5, seed=1)
    assert sorted(p for f in folds for p in f) == sorted(pairs)


def test_explanation_names_deciding_features() -> None:
    result = default_classifier().classify("Translate 'good night' into Italian")
    assert result.category == "translate"
    names = [name for name, _ in result.top_features]
    assert "w:translate" in names or "lex:translate" in names
    assert all(weight > 0 for _, weight in result.top_features)
    assert "translate" in result.explain()
    assert abs(sum(result.scores.values()) - 1.0) < 1e-9


def test_untrained_classifier_refuses() -> None:
    from p2pedge.errors import ConfigError

    with pytest.raises(ConfigError):
        NaiveBayesClassifier().classify("hello")


def test_unknown_category_lists_known_ones() -> None:
    with pytest.raises(UnknownCategory) as info:
        Catalog.load().resolve("poetry")
    message = str(info.value)
    for known in ("chat", "summarize", "translate", "explain-code", "math"):
        assert known in message
