"""Parameter validation and stop-string streaming."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pedge.protocols.infer.codec import GenParams
from p2pedge.protocols.pipeline.sampling import SamplingSpec
from p2pedge.runtime.sampling import (
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    SamplingParams,
    StopMatcher,
)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"max_tokens": -5},
        {"max_tokens": 10**9},
        {"max_tokens": True},
        {"temperature": -0.1},
        {"temperature": 10.5},
        {"temperature": MAX_TEMPERATURE + 1e-9},
        {"temperature": float("inf")},
        {"temperature": 10**400},
        {"top_k": MAX_TOP_K + 1},
        {"top_k": 2**40},
        {"seed": MAX_SEED + 1},
        {"seed": 2**63},
        {"seed": True},
        {"stop": 5},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"top_k": 2.5},
        {"seed": -1},
        {"seed": "7"},
        {"stop": "x"},
        {"stop": [""]},
        {"stop": ["s"] * 100},
    ],
)
def test_absurd_parameters_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams.make(**kwargs)  # type: ignore[arg-type]


def accepts(make: object, *args: object) -> bool:
    try:
        make(*args)  # type: ignore[operator]
    except ValueError:
        return False
    return True


values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**65), 2**65),
    st.sampled_from([0, 1, 2, 0.0, 1.0, 2.0, 1e-7, MAX_TOP_K, MAX_SEED, MAX_SEED + 1, None, True]),
)


@given(
    st.one_of(st.floats(-1, 120), values),
    st.one_of(st.floats(-0.5, 1.5), values),
    st.one_of(st.integers(-5, 2 * MAX_TOP_K), values),
    st.one_of(st.integers(-5, 2**64), values),
)
def test_the_three_parameter_types_agree_on_every_range(
    temperature: object, top_p: object, top_k: object, seed: object
) -> None:
    """Local generation, the infer protocol and the pipeline take exactly the same values,
    so nothing a peer gets past one codec fails in a later layer (issue 17)."""
    local = accepts(SamplingParams, 4, temperature, top_p, top_k, seed)
    remote = accepts(GenParams, 4, temperature, top_p, top_k, seed)
    assert local == remote
    if seed is not None:
        assert accepts(SamplingSpec, temperature, top_k, top_p, seed) == local


def test_defaults_agree() -> None:
    local, remote, ring = SamplingParams(), GenParams(), SamplingSpec()
    assert local.temperature == remote.temperature == ring.temperature == 0.0
    assert local.top_p == remote.top_p == ring.top_p and local.top_k == remote.top_k == ring.top_k
    assert local.max_tokens == remote.max_tokens
    assert local.greedy and ring.greedy


def test_a_top_k_over_the_vocabulary_is_no_cut() -> None:
    """genai refuses top_k > vocab mid-request; keeping every token is the same as top_k 0."""
    params = SamplingParams.make(temperature=0.7, top_k=MAX_TOP_K)
    assert params.search_options(30, vocab_size=355)["top_k"] == 0
    assert params.search_options(30, vocab_size=49152)["top_k"] == MAX_TOP_K
    assert params.search_options(30)["top_k"] == MAX_TOP_K


def test_greedy_and_sampled_search_options() -> None:
    greedy = SamplingParams.make(max_tokens=5).search_options(20)
    assert greedy["do_sample"] is False and greedy["top_k"] == 1 and greedy["max_length"] == 20
    sampled = SamplingParams.make(temperature=0.7, top_p=0.9, top_k=40, seed=3)
    opts = sampled.search_options(30)
    assert opts["do_sample"] is True and opts["random_seed"] == 3 and opts["top_k"] == 40
    assert opts["temperature"] == pytest.approx(0.7)


def test_stop_string_split_across_pieces_is_never_emitted() -> None:
    m = StopMatcher(["</s>"])
    out = [m.feed(p) for p in ["Hello <", "/", "s", "> tail"]]
    assert "".join(out) == "Hello " and m.stopped
    assert out[1:] == ["", "", ""]
    assert m.flush() == ""


def test_false_alarm_prefix_is_released() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ""
    assert m.feed("ART") == "START"
    assert not m.stopped


text_st = st.text(alphabet="abcS", max_size=40)


@given(text_st, st.lists(st.text(alphabet="abcS", min_size=1, max_size=4), max_size=3), st.data())
def test_streamed_output_equals_text_cut_at_first_stop(
    text: str, stops: list[str], data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces) + m.flush()
    # The stop that completes first wins; of two completing together, the longer one.
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    assert out == (text[: min(hits)[1]] if hits else text)
    assert m.stopped == bool(hits)
