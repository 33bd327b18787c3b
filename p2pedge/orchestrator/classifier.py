"""A fast, explainable request classifier: hand-made features plus multinomial naive Bayes.

Naive Bayes keeps every decision decomposable: the log-odds between the winner and the
runner-up is a sum of per-feature terms, so the top terms *are* the explanation. It trains
in milliseconds on the shipped labelled set (numpy only), which is why it is trained at
first use instead of being shipped as opaque weights.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import numpy.typing as npt

from p2pedge.errors import ConfigError

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_SHAPES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("shape:code", re.compile(r"[{};]|\(\)|=>|::|\bdef |\breturn\b|\w+\.\w+\(|\$\w|--\w|\w\[\w")),
    ("shape:arith", re.compile(r"\d\s*[-+*/^x=]\s*\d|\d\s*%|\^\d|\d+!|\b\d+/\d+\b")),
    ("shape:equation", re.compile(r"\b[a-z]\s*[\^=+]|\b\d[a-z]\b")),
    ("shape:quoted", re.compile(r"'[^']+'")),
    ("shape:non_latin", re.compile(r"[^\x00-\u024f\s\d\W]")),
    ("shape:long_after_colon", re.compile(r":\s.{40,}")),
    ("shape:ellipsis", re.compile(r"\.\.\.\s*$")),
    ("shape:number", re.compile(r"\d")),
)
_STOP = frozenset(
    "a an the of to in on at is are was be it this that these for and or with as by from "
    "me my i you your do does can could please what's what".split()
)
_LEXICON: dict[str, frozenset[str]] = {
    "lex:code": frozenset(
        "python javascript java c rust go sql bash css react docker git regex function code "
        "class method error exception loop variable compile pointer async await keyword "
        "snippet query stack trace bug syntax api library package kubectl makefile".split()
    ),
    "lex:math": frozenset(
        "solve calculate compute sum product divided times plus minus percent prime root "
        "derivative integral integrate limit probability factor equation triangle circle "
        "area volume mean average median deviation fraction decimal angle slope matrix "
        "determinant factorial multiple divisor log power cost costs many much".split()
    ),
    "lex:summary": frozenset(
        "summarize summarise summary tl dr tldr condense shorten recap gist brief briefly "
        "takeaways overview abstract synopsis essentials key points digest sum".split()
    ),
    "lex:chat": frozenset(
        "hi hello hey thanks thank goodbye bye recommend suggest ideas idea tips advice "
        "favourite favorite fun feel feeling friend friends weekend holiday trip plan gift "
        "hobby book movie music joke talk think".split()
    ),
    "lex:translate": frozenset(
        "translate translation translated say word phrase mean means language".split()
    ),
}
_LANGUAGES = frozenset(
    "english french spanish german italian portuguese dutch japanese chinese korean russian "
    "swedish polish arabic turkish greek hindi thai finnish latin".split()
)


def features(text: str) -> list[str]:
    """Feature names present in ``text`` (repeats count, as in multinomial NB)."""
    lower = text.lower()
    words = _WORD.findall(lower)
    content = [w for w in words if w not in _STOP]
    out = [f"w:{w}" for w in content]
    out += [f"b:{a}_{b}" for a, b in itertools.pairwise(words)]
    out += [name for name, lexicon in _LEXICON.items() for w in words if w in lexicon]
    out += ["lang" for w in words if w in _LANGUAGES]
    out += [name for name, pattern in _SHAPES if pattern.search(text)]
    return out


@dataclass(frozen=True)
class Classification:
    """The decision plus why: posterior per category and the features that tipped it."""

    category: str
    confidence: float
    runner_up: str
    scores: dict[str, float]
    top_features: list[tuple[str, float]]

    def explain(self) -> str:
        feats = ", ".join(f"{name} (+{weight:.2f})" for name, weight in self.top_features)
        return (
            f"{self.category} ({self.confidence:.0%}) over {self.runner_up}: "
            f"{feats or 'prior only'}"
        )


class NaiveBayesClassifier:
    """Multinomial NB with Laplace smoothing over :func:`features`."""

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = alpha
        self.classes: list[str] = []
        self.vocab: dict[str, int] = {}
        self._log_prior: npt.NDArray[np.float64] = np.zeros(0)
        self._log_lik: npt.NDArray[np.float64] = np.zeros((0, 0))

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> NaiveBayesClassifier:
        if len(texts) != len(labels) or not texts:
            raise ConfigError("need as many labels as texts, and at least one of each")
        self.classes = sorted(set(labels))
        docs = [features(t) for t in texts]
        self.vocab = {f: i for i, f in enumerate(sorted({f for d in docs for f in d}))}
        counts = np.zeros((len(self.classes), len(self.vocab)))
        prior = np.zeros(len(self.classes))
        index = {c: i for i, c in enumerate(self.classes)}
        for doc, label in zip(docs, labels, strict=True):
            row = index[label]
            prior[row] += 1
            for f in doc:
                counts[row, self.vocab[f]] += 1
        smoothed = counts + self.alpha
        self._log_lik = np.log(smoothed / smoothed.sum(axis=1, keepdims=True))
        self._log_prior = np.log(prior / prior.sum())
        return self

    def _vector(self, text: str) -> npt.NDArray[np.float64]:
        vec = np.zeros(len(self.vocab))
        for f in features(text):
            i = self.vocab.get(f)
            if i is not None:
                vec[i] += 1
        return vec

    def classify(self, text: str, *, top: int = 5) -> Classification:
        if not self.classes:
            raise ConfigError("classifier is not trained")
        vec = self._vector(text)
        joint = self._log_prior + self._log_lik @ vec
        post = np.exp(joint - joint.max())
        post /= post.sum()
        order = np.argsort(-joint)
        best = int(order[0])
        second = int(order[1]) if len(order) > 1 else best
        contrib = vec * (self._log_lik[best] - self._log_lik[second])
        names = list(self.vocab)
        ranked = [int(i) for i in np.argsort(-contrib)[:top] if contrib[i] > 0]
        return Classification(
            category=self.classes[best],
            confidence=float(post[best]),
            runner_up=self.classes[second],
            scores={c: float(p) for c, p in zip(self.classes, post, strict=True)},
            top_features=[(names[i], float(contrib[i])) for i in ranked],
        )

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.classify(t, top=0).category for t in texts]


def load_labelled() -> list[tuple[str, str]]:
    """The shipped labelled requests as ``(text, category)`` pairs."""
    raw = resources.files(__package__).joinpath("data", "requests.json").read_text("utf-8")
    data = json.loads(raw)
    return [(str(r["text"]), str(r["category"])) for r in data["requests"]]


def accuracy(model: NaiveBayesClassifier, pairs: Sequence[tuple[str, str]]) -> float:
    predicted = model.predict([t for t, _ in pairs])
    return sum(p == c for p, (_, c) in zip(predicted, pairs, strict=True)) / len(pairs)


def stratified_folds(
    pairs: Sequence[tuple[str, str]], k: int, seed: int
) -> list[list[tuple[str, str]]]:
    """``k`` folds with each category spread evenly, shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    folds: list[list[tuple[str, str]]] = [[] for _ in range(k)]
    for category in sorted({c for _, c in pairs}):
        members = [p for p in pairs if p[1] == category]
        for j, i in enumerate(rng.permutation(len(members))):
            folds[j % k].append(members[int(i)])
    return folds


def cross_validate(pairs: Sequence[tuple[str, str]], *, k: int = 5, seed: int = 0) -> float:
    """Mean held-out accuracy over ``k`` stratified folds."""
    folds = stratified_folds(pairs, k, seed)
    scores = []
    for i, held in enumerate(folds):
        train = [p for j, f in enumerate(folds) if j != i for p in f]
        model = NaiveBayesClassifier().fit([t for t, _ in train], [c for _, c in train])
        scores.append(accuracy(model, held))
    return float(np.mean(scores))


@functools.cache
def default_classifier() -> NaiveBayesClassifier:
    """Trained once per process on every shipped example."""
    pairs = load_labelled()
    return NaiveBayesClassifier().fit([t for t, _ in pairs], [c for _, c in pairs])
