"""A client checks a model with 8-bit activations at the quantized tolerance: replicas of
such a model differ by up to about 1% honestly, and the float32 tolerance would ban them."""

from pathlib import Path

import pytest

from p2pedge.node.models import int8_activations
from p2pedge.testing.tiny import models_dir

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize(("variant", "expected"), [("", True), ("-exact", False)])
def test_the_facts_say_which_models_take_8_bit_activations(variant: str, expected: bool) -> None:
    model_dir = models_dir() / f"smollm2-135m-instruct{variant}"
    assert int8_activations(model_dir) is expected


def test_a_directory_without_facts_is_taken_as_float(tmp_path: Path) -> None:
    assert int8_activations(tmp_path) is False
