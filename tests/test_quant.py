"""Weights in fewer bits (prism_ext.models.quant, issue 22): a quantized
model computes what the float32 model with the dequantized weights computes,
on every path (prefill through torch's GEMM, decoding through the
weight-only kernels, several devices and CR > 1); the quantized checkpoint
round-trips; every device of a cluster holds the same bits; the memory
numbers are what is held."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import prism_ext
import prism_ext.zoo
from prism_ext.models import BLOCK_MATRICES, skeleton_network, write_checkpoint, write_quantized
from prism_ext.models import quant
from prism_ext.models.quant import Int4, Int8, Quantized, gptq_int4, quantize, stored_bytes

from engine_helpers import family_inputs, hf_bert, hf_gpt2, hf_llama, hf_vit, save

DTYPES = ("bf16", "int8", "int4")
# int8/int4: float32 activations, so equal to the dequantized float32 model up to float32 rounding
# (summation order: the kernels' against torch's GEMM). bf16 rounds activations to bf16 too.
TOL = {"int8": 2e-4, "int4": 2e-4, "bf16": 5e-2}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {"gpt2": hf_gpt2(seed=3), "bert": hf_bert(seed=4), "vit": hf_vit(seed=5), "qwen2": hf_llama("qwen2", seed=6),
            "llama-tied": hf_llama("llama", seed=7, tie_word_embeddings=True)}
    return {k: save(m, tmp_path_factory.mktemp(k)) for k, m in made.items()}


def dequantized(model):
    """The float32 twin of a quantized model: every quantized weight replaced by its dequantized matrix."""
    ref = copy.deepcopy(model)
    net = ref.net
    done = {}

    def plain(w):
        if isinstance(w, Quantized):
            done.setdefault(id(w), w.dequantize())
            return done[id(w)]
        return w

    for blk in net.blocks:
        for name in BLOCK_MATRICES:
            setattr(blk, name, plain(getattr(blk, name)))
    for name in net.quantized_tables:
        setattr(net, name, plain(getattr(net, name)))
    net.weight_dtype = "fp32"
    return ref


def scale_of(t: torch.Tensor) -> float:
    return float(t.abs().max()) + 1.0


@pytest.fixture(params=["float32", "this-cpu"])
def prefill_gemm(request, monkeypatch):
    """The prefill path's GEMM: float32 (forced), or what this CPU gets
    (bf16 where it multiplies bf16 in hardware)."""
    if request.param == "float32":
        monkeypatch.setattr(quant, "native_bf16", lambda: False)
    return "bf16" if quant.native_bf16() else "float32"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["gpt2", "bert", "vit", "qwen2", "llama-tied"])
def test_quantized_model_equals_float32_with_the_dequantized_weights(checkpoints, family, dtype, prefill_gemm):
    """19 positions: the prefill path (dequantize + GEMM) at one device, the
    kernels at three (6-7 rows each)."""
    tol = TOL["bf16"] if prefill_gemm == "bf16" else TOL[dtype]
    m = prism_ext.load(checkpoints[family], weight_dtype=dtype)
    ref = dequantized(m)
    assert m.net.weight_dtype == dtype and all(isinstance(blk.w2, Quantized) for blk in m.net.blocks)
    inputs = family_inputs("gpt2" if family.startswith("llama") else family, 19, seed=1)
    for devices, cr in ((1, 1), (3, 2)):
        got, want = m(inputs, devices=devices, cr=cr), ref(inputs, devices=devices, cr=cr)
        for key in want:
            if key != "stats":
                diff = float((got[key] - want[key]).abs().max())
                assert diff <= tol * scale_of(want[key]), (family, dtype, devices, key, diff)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_decoding_runs_the_weight_only_kernels_and_equals_the_float32_model(checkpoints, dtype):
    """Greedy generation (decoding: one row per step, the kernels' path) at
    P = 2, CR = 2 equals the dequantized float32 model's, token for token."""
    for family in ("gpt2", "qwen2"):
        m = prism_ext.load(checkpoints[family], weight_dtype=dtype)
        ids = family_inputs("gpt2", 16, seed=2)["input_ids"][:1]
        got = m.generate(ids, max_new_tokens=8, devices=2, cr=2)
        want = dequantized(m).generate(ids, max_new_tokens=8, devices=2, cr=2)
        assert torch.equal(got, want), family


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_many_rows_run_a_bf16_gemm_exactly_where_the_cpu_multiplies_bf16(dtype, prefill_gemm):
    """Above KERNEL_ROWS rows: torch's GEMM over the dequantized weight, in
    bf16 on a CPU with bf16 in hardware, else float32; up to it: the
    kernels, float32 whatever the CPU."""
    torch.manual_seed(0)
    w, bias = torch.randn(40, 64), torch.randn(40)
    q = quantize(w, dtype)
    wd = q.dequantize()
    many, few = torch.randn(quant.KERNEL_ROWS + 1, 64), torch.randn(quant.KERNEL_ROWS, 64)
    if prefill_gemm == "bf16":
        want = F.linear(many.bfloat16(), wd.bfloat16(), bias.bfloat16()).float()
    else:
        want = F.linear(many, wd, bias)
    torch.testing.assert_close(q.linear(many, bias), want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(q.linear(few, bias), F.linear(few.double(), wd.double(), bias.double()).float(),
                               rtol=1e-5, atol=1e-4)


def test_the_quantized_matrices_are_what_quantize_makes():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    q8, q4 = quantize(w, "int8"), quantize(w, "int4")
    assert isinstance(q8, Int8) and q8.q.dtype == torch.int8 and q8.scale.shape == (48,)
    assert isinstance(q4, Int4) and q4.q.shape == (48, 32) and q4.scale.shape == (48, 2) and q4.group == 32
    # rounding to the nearest level: at most half a step away
    assert float((q8.dequantize() - w).abs().max() / q8.scale.max()) <= 0.5 + 1e-5
    steps = q4.scale.repeat_interleave(32, dim=1)
    assert bool(((q4.dequantize() - w).abs() <= 0.5 * steps + 1e-5).all())
    # a width that int4's group does not divide keeps int8 (and says so in its type)
    assert isinstance(quantize(torch.randn(8, 40), "int4"), Int8)
    for t in (q8, q4):
        assert t.nbytes == stored_bytes(tuple(w.shape), t.dtype)
        sub = t[16:32]
        torch.testing.assert_close(sub.dequantize(), t.dequantize()[16:32], rtol=0, atol=0)
        ids = torch.tensor([[3, 5], [47, 0]])
        torch.testing.assert_close(t.take(ids), t.dequantize()[ids], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_checkpoint_round_trips(checkpoints, tmp_path, dtype):
    for family in ("gpt2", "llama-tied", "bert"):
        m = prism_ext.load(checkpoints[family], weight_dtype=dtype)
        out = write_quantized(m.net, checkpoints[family], tmp_path / f"{family}-{dtype}")
        assert not (out / "model.safetensors").exists()  # no float32 weights travel to the board
        back = prism_ext.load(out)
        assert back.net.weight_dtype == dtype
        assert back.net.weights_digest() == m.net.weights_digest()
        assert back.net.weight_bytes() == m.net.weight_bytes()
        if family == "llama-tied":
            assert back.net.lm_head is back.net.embed_tokens  # still one table
        inputs = family_inputs("gpt2" if family != "bert" else "bert", 11, seed=3)
        torch.testing.assert_close(back(inputs, devices=2, cr=2).last_hidden_state,
                                   m(inputs, devices=2, cr=2).last_hidden_state, rtol=0, atol=0)
        assert prism_ext.load(out, weight_dtype=dtype).net.weights_digest() == m.net.weights_digest()


def test_bad_quantized_checkpoints_and_uses_are_refused(checkpoints, tmp_path):
    m = prism_ext.load(checkpoints["gpt2"], weight_dtype="int8")
    with pytest.raises(ValueError, match="weight_dtype: this network is int8; write it with write_quantized"):
        write_checkpoint(m.net, checkpoints["gpt2"], tmp_path / "x")
    with pytest.raises(ValueError, match="weight_dtype: this network is fp32"):
        write_quantized(prism_ext.load(checkpoints["gpt2"]).net, checkpoints["gpt2"], tmp_path / "y")
    with pytest.raises(ValueError, match="weight_dtype: expected one of fp32, bf16, int8, int4, got 'int3'"):
        prism_ext.load(checkpoints["gpt2"], weight_dtype="int3")
    out = write_quantized(m.net, checkpoints["gpt2"], tmp_path / "q")
    meta = json.loads((out / "prism_quantized.json").read_text())
    (out / "prism_quantized.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(ValueError, match="prism_quantized.json: .* another version of prism-ext"):
        prism_ext.load(out)
    (out / "prism_quantized.json").write_text(json.dumps({**meta, "weight_dtype": "int3"}))
    with pytest.raises(ValueError, match="is malformed"):
        prism_ext.load(out)
    (out / "prism_quantized.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="already int8"):
        prism_ext.load(out, weight_dtype="int4")


def test_training_and_tensor_parallelism_need_float32_weights(checkpoints):
    from prism_ext.method import twin
    from prism_ext.method.engine import RunConfig
    from prism_ext.method.partition import partition

    m = prism_ext.load(checkpoints["gpt2"], weight_dtype="int8")
    ids = family_inputs("gpt2", 12)
    with pytest.raises(ValueError, match="mode: 'tp' needs fp32 weights; this model's are int8"):
        m(ids, devices=2, mode="tp")
    with pytest.raises(ValueError, match="weight_dtype: the twin trains fp32 weights"):
        twin.forward(m.net, ids, partition(12, 2), RunConfig(crs=(2,) * len(m.net.blocks)))


def test_weight_bytes_from_shapes_equal_what_quantizing_holds(checkpoints):
    for family, path in checkpoints.items():
        skeleton = skeleton_network(path)
        for dtype in ("fp32", *DTYPES):
            assert skeleton.weight_bytes_as(dtype) == prism_ext.load(path, weight_dtype=dtype).net.weight_bytes(), \
                (family, dtype)
    sizes = {d: prism_ext.load(checkpoints["qwen2"], weight_dtype=d).net.weight_bytes() for d in ("fp32", *DTYPES)}
    assert sizes["fp32"] > sizes["bf16"] > sizes["int8"] > sizes["int4"]


def test_every_run_reports_each_devices_weights_rss_and_kv_cache(checkpoints):
    m = prism_ext.load(checkpoints["qwen2"], weight_dtype="int4")
    out = m(family_inputs("gpt2", 20), devices=2, cr=2)
    assert [d.weight_bytes for d in out.stats.devices] == [m.net.weight_bytes()] * 2
    assert all(d.peak_rss > m.net.weight_bytes() for d in out.stats.devices)
    assert all(d.kv_cache_bytes == 0 for d in out.stats.devices)  # a forward pass keeps no cache
    ids = family_inputs("gpt2", 20)["input_ids"][:1]
    _, stats, _ = m.generate(ids, max_new_tokens=4, devices=2, cr=2, return_stats=True)
    last = stats.devices[-1]
    kv_width = m.net.blocks[0].kv_width  # kv heads only: 2 of 4 heads here
    assert kv_width < m.net.d
    # per layer and row: a key and a value of kv_width (not d) floats, a count and a position
    per_row = len(m.net.blocks) * (2 * kv_width * 4 + 4 + 4)
    rows, rest = divmod(last.kv_cache_bytes, per_row)
    # own 10 rows + room for the 3 decoded tokens + fewer rows than device 0's 10 (its means)
    assert rest == 0 and 10 + 3 < rows < 10 + 3 + 10, (rows, rest)
    assert stats.devices[0].kv_cache_bytes == 0


def test_gptq_rounds_to_nearest_for_uncorrelated_inputs_and_otherwise_cuts_the_output_error():
    """GPTQ's codes in the same Q4_1 form (scales and offsets are rounding's):
    with inputs of equal energy and no correlation there is no error to
    spread, so they are rounding's codes bit for bit; with correlated
    inputs the layer's output error on them is far below rounding's."""
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    nearest = quantize(w, "int4")
    same = gptq_int4(w, torch.eye(64))
    assert torch.equal(same.q, nearest.q) and torch.equal(same.scale, nearest.scale)
    x = torch.randn(2048, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(2048, 64)  # low rank + noise
    chosen = gptq_int4(w, x.T @ x)
    assert torch.equal(chosen.scale, nearest.scale) and torch.equal(chosen.offset, nearest.offset)
    assert not torch.equal(chosen.q, nearest.q)

    def output_error(q: Int4) -> float:
        return float(((x.double() @ (w.double() - q.dequantize().double()).T) ** 2).mean())

    assert output_error(chosen) < 0.2 * output_error(nearest), (output_error(chosen), output_error(nearest))
    with pytest.raises(ValueError, match=r"hessian: expected \[64, 64\]"):
        gptq_int4(w, torch.eye(32))
    with pytest.raises(ValueError, match="group: must divide"):
        gptq_int4(w, torch.eye(64), group=24)


CALIBRATION = [" ".join(p.split()) for p in prism_ext.zoo.text_split()[0].decode().split("\n\n")
               if len(p.split()) >= 20]  # training paragraphs, one line each (a calibration file's form)


def test_calibrated_int4_is_closer_to_the_float32_model_on_held_out_text():
    """``load(weight_dtype="int4", calibration=texts)``: the blocks' codes
    chosen by GPTQ on training paragraphs bring gpt2-tiny's logits on the
    held-out topics closer to the float32 model's than rounding does, at
    one device and under PRISM; only the codes differ (same bytes)."""
    from prism_ext import zoo

    held = torch.tensor(list(zoo.text_split()[1][: 8 * 128]), dtype=torch.long).reshape(8, 128)
    fp32, nearest = prism_ext.load("gpt2-tiny"), prism_ext.load("gpt2-tiny", weight_dtype="int4")
    chosen = prism_ext.load("gpt2-tiny", weight_dtype="int4", calibration=CALIBRATION[:200])
    assert chosen.net.weight_bytes() == nearest.net.weight_bytes()
    assert chosen.net.weights_digest() != nearest.net.weights_digest()
    for devices, cr in ((1, 1), (4, 4)):
        want = fp32({"input_ids": held}, devices=devices, cr=cr).logits
        errors = [float(((m({"input_ids": held}, devices=devices, cr=cr).logits - want) ** 2).mean())
                  for m in (chosen, nearest)]
        assert errors[0] < 0.8 * errors[1], (devices, cr, errors)


def test_calibration_is_refused_where_it_cannot_apply(checkpoints):
    with pytest.raises(ValueError, match="calibration: chooses int4 codes; weight_dtype 'int8'"):
        prism_ext.load("gpt2-tiny", weight_dtype="int8", calibration=CALIBRATION[:2])
    with pytest.raises(ValueError, match="calibration: vit takes no text"):
        prism_ext.load("vit-tiny-digits", weight_dtype="int4", calibration=CALIBRATION[:2])
    with pytest.raises(ValueError, match=r"calibration\[1\]: expected a non-blank str"):
        prism_ext.load("gpt2-tiny", weight_dtype="int4", calibration=[CALIBRATION[0], "  "])
    with pytest.raises(TypeError, match="calibration: expected a list of texts"):
        prism_ext.load("gpt2-tiny", weight_dtype="int4", calibration=CALIBRATION[0])
    with pytest.raises(ValueError, match="calibration: no text given"):
        prism_ext.load("gpt2-tiny", weight_dtype="int4", calibration=[])


def test_the_cli_quantizes_runs_on_processes_and_says_what_a_device_needs(tmp_path):
    """`prism quantize`, then `prism run` over real processes on the small
    checkpoint (the workers load the same bits: the handshake compares
    digests) equal to the simulation, and `prism info --model` printing
    what quantizing holds."""
    prism = [sys.executable, "-m", "prism_ext"]
    out = tmp_path / "q4"
    texts = tmp_path / "calibration.txt"
    texts.write_text("\n".join(CALIBRATION[:20]))
    r = subprocess.run(prism + ["quantize", "--model", "gpt2-tiny", "--weight-dtype", "int4", "--out", str(out),
                                "--calibration", str(texts)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    missing = subprocess.run(prism + ["quantize", "--model", "gpt2-tiny", "--weight-dtype", "int4", "--out",
                                      str(tmp_path / "q"), "--calibration", str(tmp_path / "none.txt")],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert missing.returncode == 2 and "calibration: " in missing.stderr and "none.txt" in missing.stderr
    calibrated = prism_ext.load("gpt2-tiny", weight_dtype="int4", calibration=CALIBRATION[:20])
    assert prism_ext.load(out).net.weights_digest() == calibrated.net.weights_digest()
    runs = []
    for where in ([], ["--simulate"]):
        r = subprocess.run(prism + ["run", "--model", str(out), "--text", "The for statement", "-P", "2",
                                    "--max-new-tokens", "6", "--no-compare", "--json", "-q", *where],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        runs.append(json.loads(r.stdout))
    assert runs[0]["output"] == runs[1]["output"] and runs[0]["runtime"].startswith("2 processes")
    held = prism_ext.load(out).net.weight_bytes()
    assert [d["weight_bytes"] for d in runs[0]["stats"]["devices"]] == [held, held]
    info = subprocess.run(prism + ["info", "--model", "gpt2-tiny", "--weight-dtype", "int4"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert f"weights {held / (1 << 20):.1f} MiB on every device" in info.stdout, info.stdout
    bad = subprocess.run(prism + ["info", "--model", str(tmp_path / "nothing")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert bad.returncode != 0 and bad.stdout == "" and "nothing" in bad.stderr, (bad.stdout, bad.stderr)


def test_a_child_process_reports_its_own_peak_memory_not_its_parents(tmp_path):
    """Linux carries ru_maxrss over fork and exec: a worker started by a
    large rank 0 would report rank 0's peak as its own."""
    from prism_ext.method.engine import peak_rss

    big = torch.ones(768 << 20, dtype=torch.uint8)  # 768 MiB, touched: this process's peak grows by it
    assert peak_rss() >= big.numel()
    r = subprocess.run([sys.executable, "-c", "from prism_ext.method.engine import peak_rss; print(peak_rss())"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, check=True)
    assert int(r.stdout) < big.numel() // 2, int(r.stdout) >> 20
    del big
