"""RunOptions: the one place a run's settings are declared and checked; every
entry point takes it (or keywords that build one) and derives its lists from it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import prism_ext
from prism_ext import RunOptions
from prism_ext.options import run_options

TEXT = "The for statement is used to iterate over the elements of a sequence, such as a string or a list"


def test_defaults_are_the_method_and_every_field_is_documented():
    o = RunOptions()
    assert (o.mode, o.cr, o.wire_dtype, o.compression_point, o.mean_weighting, o.exact_rows, o.device_weights,
            o.outputs) == ("prism", 1, "fp32", "default", "count", "default", None, ("rows", "cls"))
    source = open(prism_ext.options.__file__).read()
    for name in RunOptions.fields():  # a docstring line right under each field
        line = next(i for i, text in enumerate(source.splitlines()) if text.strip().startswith(f"{name}:"))
        assert source.splitlines()[line + 1].strip().startswith('"""'), name


@pytest.mark.parametrize("field, value, error", [
    ("mode", "fast", ValueError), ("cr", 0, ValueError), ("cr", True, TypeError), ("cr", 2.0, TypeError),
    ("cr", [], ValueError), ("cr", [4, 0], ValueError), ("wire_dtype", "fp8", ValueError),
    ("compression_point", "output", ValueError), ("mean_weighting", "sqrt", ValueError),
    ("exact_rows", "special+top0", ValueError), ("exact_rows", 3, TypeError),
    ("device_weights", [1, float("nan")], ValueError), ("device_weights", [], ValueError),
    ("device_weights", [1, -2], ValueError), ("device_weights", "2,1", TypeError),
    ("outputs", (), ValueError), ("outputs", ("rows", "all"), ValueError), ("outputs", "rows", TypeError),
])
def test_a_bad_value_is_refused_by_name(field, value, error):
    with pytest.raises(error, match=f"^{field}:"):
        RunOptions(**{field: value})


def test_sequences_are_normalised_and_the_object_is_frozen():
    o = RunOptions(cr=[4, 8], device_weights=[2, 1], outputs=["pooled"])
    assert o.cr == (4, 8) and o.device_weights == (2.0, 1.0) and o.outputs == ("pooled",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.cr = 2
    assert o.replace(cr=16).cr == 16 and o.cr == (4, 8)
    with pytest.raises(TypeError, match="^crr: not a run option"):
        o.replace(crr=4)
    assert run_options(o, mode="voltage") == RunOptions(mode="voltage", cr=(4, 8), device_weights=(2, 1),
                                                        outputs=("pooled",))
    with pytest.raises(TypeError, match="^options:"):
        run_options({"cr": 4})


def test_options_and_keywords_run_the_same(gpt):
    ids = gpt.tokenizer(TEXT, return_tensors="pt").input_ids
    by_keywords = gpt(ids, devices=3, cr=2, wire_dtype="fp16", exact_rows="first")
    by_options = gpt(ids, devices=3, options=RunOptions(cr=2, wire_dtype="fp16", exact_rows="first"))
    # keywords change the given options
    mixed = gpt(ids, devices=3, options=RunOptions(cr=8, wire_dtype="fp16"), cr=2, exact_rows="first")
    assert torch.equal(by_keywords.logits, by_options.logits) and torch.equal(by_keywords.logits, mixed.logits)
    assert by_keywords.stats.crs == by_options.stats.crs == (2,) * len(gpt.net.blocks)
    assert not torch.equal(by_keywords.logits, gpt(ids, devices=3, cr=8).logits)
    with pytest.raises(TypeError, match="^crr: unexpected keyword argument"):
        gpt(ids, devices=3, crr=2)


def test_generate_takes_the_same_options(gpt):
    ids = gpt.tokenizer(TEXT, return_tensors="pt").input_ids[:, :12]
    a = gpt.generate(ids, devices=2, cr=3, max_new_tokens=4)
    b = gpt.generate(ids, devices=2, options=RunOptions(cr=3), max_new_tokens=4)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="^mode: generation runs in prism or single mode"):
        gpt.generate(ids, devices=2, mode="voltage", max_new_tokens=4)


def test_the_lists_of_settings_derive_from_the_fields():
    from prism_ext.runtime.session import mismatches

    # the handshake compares every field a rank can pin (all but outputs, rank 0's affair)
    base = {"version": "1", "model_type": "gpt2", "config": "c", "weights": "w"}
    for name in RunOptions.fields():
        found = mismatches([{**base, "settings": {name: "a"}}, {**base, "settings": {name: "b"}}])
        assert found == ([] if name == "outputs" else [f"rank 1: {name} b differs from rank 0's a"]), name
    from prism_ext import serve  # the serve extra is part of the test extra
    assert set(serve.KNOBS) == set(RunOptions.fields()) - {"mode", "cr", "device_weights", "outputs"}
