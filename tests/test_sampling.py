"""Sampling as transformers composes it (temperature, then top_k, then
top_p), and n independent samples with a seed derived per sample."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from prism_ext.method.engine import GenerateOptions, sample_seed, warp_logits


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, 0.9), (0.7, 20, 0.8), (1.3, 5, 0.5), (0.5, None, 0.0), (2.0, 40, 1.0), (1.0, 3, None)])
def test_warped_logits_equal_transformers_warpers(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 64, dtype=torch.float64) * 3
    want = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p is not None and top_p < 1.0:  # transformers refuses top_p = 1 as a no-op; ours passes it through
        want = TopPLogitsWarper(top_p)(None, want)
    got = warp_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))  # the same tokens kept
    torch.testing.assert_close(torch.softmax(got, -1), torch.softmax(want, -1), rtol=0, atol=1e-12)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    kept = ~torch.isinf(warp_logits(logits, 1.0, None, 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(warp_logits(logits, 1.0, None, 0.0))  # at least one token stays
    assert kept.tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", True])
def test_top_p_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match="top_p"):
        GenerateOptions(temperature=1.0, top_p=bad)


def test_each_row_samples_with_its_own_seed(gpt):
    """Row b of a batch samples with sample_seed(seed, b): row 0 is the
    one-row generation with that seed, and the rows differ from each other."""
    ids = torch.tensor([gpt.tokenizer.encode("The for statement is used to iterate")])
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9)
    three = gpt.generate(ids.repeat(3, 1), seed=11, **kw)
    for b in range(3):
        alone = gpt.generate(ids, seed=sample_seed(11, b), **kw)
        assert torch.equal(three[b], alone[0])
    assert sample_seed(11, 0) == 11
    assert len({tuple(r.tolist()) for r in three}) == 3
