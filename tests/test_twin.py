"""The differentiable twin (prism_ext.method.twin) against the engine, its
gradients, and the checkpoint it trains into (models.write_checkpoint)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import prism_ext
from engine_helpers import LLAMA_FAMILIES, family_inputs, hf_llama, save, tiny_models
from prism_ext.method import twin
from prism_ext.method.engine import RunConfig
from prism_ext.models import load_network, write_checkpoint
from prism_ext.options import RunOptions
from prism_ext.method.partition import AccuracyWarning, partition
from prism_ext.executor.local import simulate
from prism_ext.executor.request import plan

FAMILIES = ("gpt2", "bert", "vit") + tuple(LLAMA_FAMILIES)
TOL = 1e-4  # float32 SDPA against the C++ kernels; the largest error seen is ~2e-6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    found = tiny_models(tmp_path_factory, 40)
    for i, family in enumerate(LLAMA_FAMILIES):
        hf = hf_llama(family, seed=40 + i)
        found[family] = (hf, prism_ext.load(save(hf, tmp_path_factory.mktemp(family))))
    for family in ("gpt2", "bert"):  # ids frequent in the random inputs stand in for special tokens
        found[family][1].__dict__["special_ids"] = (3, 5)
    return found


def _valid_rows(inputs: dict, t: torch.Tensor) -> torch.Tensor:
    """Rows at padding are nobody's output (HF leaves them unspecified too)."""
    mask = inputs.get("attention_mask")
    return t if mask is None or t.dim() < 3 else t[mask.bool()]


def _engine_and_twin(m, inputs, devices, cr, exact_rows="none", **knobs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccuracyWarning)
        request = plan(m.net, inputs, RunOptions(cr=cr, exact_rows=exact_rows, **knobs), devices=devices,
                       special_ids=m.special_ids)
    engine = simulate(m.net, inputs, request).fields
    return engine, twin.forward(m.net, inputs, request.partition, request.cfg)


def _max_err(inputs, engine, got) -> float:
    assert set(engine) == set(got)
    return max((_valid_rows(inputs, engine[k]) - _valid_rows(inputs, got[k])).abs().max().item() for k in engine)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cr", [1, 2, 4, 7])
@pytest.mark.parametrize("devices", [1, 2, 3])
def test_twin_equals_the_engine(models, family, cr, devices):
    _, m = models[family]
    inputs = family_inputs(family, 17, seed=cr)
    engine, got = _engine_and_twin(m, inputs, devices, cr)
    assert _max_err(inputs, engine, got) < TOL


# top<K> picks rows by norm: on a post-LN model (BERT) every row leaves a
# LayerNorm with nearly the same norm, so which rows win is float noise and
# the engine and the twin may pick differently; it is checked on the pre-LN ones.
@pytest.mark.parametrize("family,spec", [(f, s) for f in FAMILIES for s in ("special", "first+adaptive")]
                         + [("gpt2", "top2"), ("vit", "first+top1")])
@pytest.mark.parametrize("cr", [2, 4, 7])
def test_twin_equals_the_engine_with_exact_rows(models, family, spec, cr):
    _, m = models[family]
    inputs = family_inputs(family, 17, seed=cr)
    engine, got = _engine_and_twin(m, inputs, 3, cr, spec)
    assert _max_err(inputs, engine, got) < TOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("knobs", [{"compression_point": "hidden"}, {"mean_weighting": "none"},
                                   {"compression_point": "attn_input"}, {"compression_point": "kv"}])
def test_twin_equals_the_engine_with_knobs(models, family, knobs):
    _, m = models[family]
    inputs = family_inputs(family, 17, seed=3)
    engine, got = _engine_and_twin(m, inputs, 3, [2, 4], **knobs)  # per-layer CR too
    assert _max_err(inputs, engine, got) < TOL


def test_twin_compression_matters(models):
    """The equality above is not trivial: CR changes the twin's outputs."""
    _, m = models["gpt2"]
    inputs = family_inputs("gpt2", 17)
    cfgs = [RunConfig.make(len(m.net.blocks), cr=cr) for cr in (1, 4)]
    a, b = (twin.forward(m.net, inputs, partition(17, 3), c)["logits"] for c in cfgs)
    assert (a - b).abs().max().item() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_weight(models, family):
    _, m = models[family]
    net = copy.deepcopy(m.net)
    params = net.named_tensors()
    for p in params.values():
        p.requires_grad_(True)
    inputs = family_inputs(family, 17)
    out = twin.forward(net, inputs, partition(17, 3), RunConfig.make(len(net.blocks), cr=4))
    sum((v ** 2).mean() for v in out.values()).backward()
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_twin_rejects_what_it_does_not_model(models):
    _, m = models["gpt2"]
    inputs = family_inputs("gpt2", 17)
    layers = len(m.net.blocks)
    with pytest.raises(ValueError, match="mode"):
        twin.forward(m.net, inputs, partition(17, 2), RunConfig.make(layers, mode="voltage"))
    with pytest.raises(ValueError, match="wire_dtype"):
        twin.forward(m.net, inputs, partition(17, 2), RunConfig.make(layers, wire_dtype="int8"))
    with pytest.raises(ValueError, match="part"):
        twin.forward(m.net, inputs, partition(16, 2), RunConfig.make(layers))


@pytest.mark.parametrize("family", FAMILIES)
def test_written_checkpoint_reloads_in_transformers_and_prism_ext(models, family, tmp_path):
    """Change every tensor, write the checkpoint back, read it with both."""
    hf, m = models[family]
    net = copy.deepcopy(m.net)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.named_tensors().values():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    write_checkpoint(net, m.directory, tmp_path / "out")
    again, _ = load_network(tmp_path / "out")
    for (name, a), b in zip(net.named_tensors().items(), again.named_tensors().values()):
        assert torch.equal(a, b), name
    inputs = family_inputs(family, 17)
    reloaded = type(hf).from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        theirs = reloaded(**inputs)
    ours = prism_ext.load(tmp_path / "out")(inputs)
    assert (_valid_rows(inputs, theirs.logits) - _valid_rows(inputs, ours.logits)).abs().max() < 1e-4
    with torch.no_grad():
        before = hf(**inputs).logits
    assert (_valid_rows(inputs, before) - _valid_rows(inputs, ours.logits)).abs().max() > 1e-3  # the change landed


def test_write_checkpoint_refuses_its_own_directory(models):
    _, m = models["bert"]
    with pytest.raises(ValueError, match="out"):
        write_checkpoint(m.net, m.directory, m.directory)


@pytest.mark.parametrize("family", FAMILIES)
def test_twin_returns_every_layers_hidden_state(models, family):
    """hidden_states=True: one [B, N, d] per block (what `prism finetune
    --distill-layers all` matches), the other fields unchanged; at one device
    every layer equals transformers' own hidden states."""
    hf, m = models[family]
    inputs = family_inputs(family, 17)
    cfg = RunConfig.make(len(m.net.blocks))
    plain = twin.forward(m.net, inputs, partition(17, 1), cfg)
    got = twin.forward(m.net, inputs, partition(17, 1), cfg, hidden_states=True)
    layers = got.pop("hidden_states")
    assert set(got) == set(plain) and all(torch.equal(got[k], plain[k]) for k in plain)
    assert len(layers) == len(m.net.blocks) and all(h.shape[-1] == m.net.d for h in layers)
    with torch.no_grad():
        theirs = hf(**inputs, output_hidden_states=True).hidden_states[1:]  # [0] is the embeddings
    for i, (a, b) in enumerate(zip(layers, theirs)):
        if family not in ("bert", "vit") and i == len(layers) - 1:
            continue  # transformers applies the final norm to a decoder's last hidden state; ours is the block's output
        assert _max_err(inputs, {"h": b}, {"h": a}) < TOL, i
    prism = twin.forward(m.net, inputs, partition(17, 3), RunConfig.make(len(m.net.blocks), cr=4), hidden_states=True)
    assert (prism["hidden_states"][-1] - layers[-1]).abs().max() > 1e-3  # compression shows at every depth
