"""`POST /v1/chat/completions` (issue 21): messages rendered with the
checkpoint's own chat template, answered whole or streamed, through the
official openai client against a real `prism serve` (test_serve's Server).

The checkpoint is a tiny random Llama with a byte-level BPE tokenizer trained
here and SmolLM2's ChatML template (with its eos_token variable and a
raise_exception); its eos id is chosen as a token the served model decodes
greedily, so that a conversation ends on eos without trained weights."""

from __future__ import annotations

import json
import shutil
import string

import openai
import pytest
import torch

import prism_ext
from engine_helpers import hf_llama, save
from serve_helpers import Server, client_of

# SmolLM2-Instruct's template with eos_token for its literal <|im_end|>, and one check of its own
CHATML = ("{% for message in messages %}"
          "{% if message['role'] == 'system' and not loop.first %}"
          "{{ raise_exception('a system message must come first') }}{% endif %}"
          "{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a tiny test model' + eos_token + '\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [string.printable, "The quick brown fox jumps over the lazy dog. " * 4,
          "What is the capital of France? Paris is the capital of France.", "Hello, how are you today?"]
HELLO = [{"role": "user", "content": "Hello, how are you?"}]
CONVERSATIONS = [
    HELLO,
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"}],
]
CR = 2


def write_chat_checkpoint(path, template=CHATML):
    """A tiny random Llama (vocabulary = the tokenizer's) with tokenizer.json
    and a tokenizer_config.json holding ``template`` (None: no chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=160, special_tokens=SPECIALS, show_progress=False))
    save(hf_llama("llama", seed=3, vocab_size=tok.get_vocab_size(), max_position_embeddings=128), path)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "model_max_length": 128,
              "clean_up_tokenization_spaces": False}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def set_eos(path, eos: int) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))


def greedy(model, messages, n: int) -> list[int]:
    """The tokens the served model decodes greedily for ``messages`` (no eos), as rank 0 + 1 worker at CR 2."""
    ids = model.tokenizer.encode(model.apply_chat_template(messages), add_special_tokens=False)
    return model.generate(torch.tensor([ids]), devices=2, cr=CR, max_new_tokens=n)[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """(the checkpoint's directory, the greedy tokens for HELLO, the step at which eos is emitted)."""
    path = write_chat_checkpoint(tmp_path_factory.mktemp("chat-llama"))
    tokens = greedy(prism_ext.load(path), HELLO, 16)
    k = next(i for i in range(3, 16) if tokens[i] not in tokens[:i])  # eos: a token first decoded at step k >= 3
    set_eos(path, tokens[k])
    return path, tokens, k


@pytest.fixture(scope="module")
def chat_server(chat, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("chat-serve"), "--model", str(chat[0]), "--devices", "2", "--cr", str(CR),
               "--max-tokens", "32")
    yield s
    s.stop()


def name_of(path) -> str:
    return str(path)


class TestTemplate:
    @pytest.mark.parametrize("messages", CONVERSATIONS)
    def test_rendered_prompt_equals_transformers(self, chat, messages):
        import transformers

        want = transformers.AutoTokenizer.from_pretrained(str(chat[0])).apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
        assert prism_ext.load(chat[0]).apply_chat_template(messages) == want
        assert want.startswith("<|im_start|>") and want.endswith("<|im_start|>assistant\n")

    def test_the_template_comes_from_a_named_list_or_a_jinja_file(self, chat, tmp_path):
        for variant in ("list", "jinja"):
            path = tmp_path / variant
            shutil.copytree(chat[0], path)
            config = json.loads((path / "tokenizer_config.json").read_text())
            if variant == "list":
                config["chat_template"] = [{"name": "tool_use", "template": "{{ raise_exception('not this') }}"},
                                           {"name": "default", "template": CHATML}]
            else:
                del config["chat_template"]
                (path / "chat_template.jinja").write_text(CHATML)
            (path / "tokenizer_config.json").write_text(json.dumps(config))
            m = prism_ext.load(path)
            assert m.chat_template == CHATML
            assert m.apply_chat_template(HELLO) == prism_ext.load(chat[0]).apply_chat_template(HELLO)

    def test_a_checkpoint_without_a_template_has_none(self):
        m = prism_ext.load("gpt2-tiny")
        assert m.chat_template is None
        with pytest.raises(ValueError, match="chat template"):
            m.apply_chat_template(HELLO)


class TestChatCompletions:
    def test_chat_equals_the_completion_of_the_rendered_prompt(self, chat, chat_server):
        c = client_of(chat_server)
        model = prism_ext.load(chat[0])
        name = name_of(chat[0])
        for messages in CONVERSATIONS:
            ids = model.tokenizer.encode(model.apply_chat_template(messages), add_special_tokens=False)
            r = c.chat.completions.create(model=name, messages=messages, max_tokens=3, temperature=0)
            want = c.completions.create(model=name, prompt=ids, max_tokens=3, temperature=0)
            assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
            [choice] = r.choices
            assert choice.message.role == "assistant" and choice.index == 0
            assert choice.message.content == want.choices[0].text
            assert choice.finish_reason == want.choices[0].finish_reason
            assert r.usage.model_dump() == want.usage.model_dump()
            assert r.usage.prompt_tokens == len(ids)
        assert c.chat.completions.create(model=name, messages=HELLO, max_tokens=3).choices[0].message.content == \
            model.tokenizer.decode(chat[1][:3])

    def test_eos_ends_with_stop_and_the_limit_with_length(self, chat, chat_server):
        _, tokens, k = chat
        c = client_of(chat_server)
        r = c.chat.completions.create(model=name_of(chat[0]), messages=HELLO, max_tokens=20)
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content == prism_ext.load(chat[0]).tokenizer.decode(tokens[:k])
        assert r.usage.completion_tokens == k + 1  # the eos is decoded, then decoding ends
        r = c.chat.completions.create(model=name_of(chat[0]), messages=HELLO, max_tokens=k)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == k

    def test_a_stop_string_ends_the_decoding(self, chat, chat_server):
        c = client_of(chat_server)
        name = name_of(chat[0])
        full = c.chat.completions.create(model=name, messages=HELLO, max_tokens=20).choices[0].message.content
        stop = full[2:4]
        r = c.chat.completions.create(model=name, messages=HELLO, max_tokens=20, stop=[stop])
        assert r.choices[0].message.content == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens < chat[2] + 1  # fewer tokens decoded than up to eos
        assert r.model_extra["prism"]["decode"]["tokens"] == r.usage.completion_tokens

    @pytest.mark.parametrize("messages", CONVERSATIONS)
    def test_stream_equals_the_whole_answer(self, chat, chat_server, messages):
        c = client_of(chat_server)
        kw = dict(model=name_of(chat[0]), messages=messages, max_tokens=12)
        whole = c.chat.completions.create(**kw)
        chunks = list(c.chat.completions.create(stream=True, **kw))
        assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(ch.choices[0].delta.role is None for ch in chunks[1:])
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
        assert [ch.choices[0].finish_reason for ch in chunks][-1] == whole.choices[0].finish_reason
        assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])
        assert chunks[-1].usage.model_dump() == whole.usage.model_dump()

    def test_sampled_chat_equals_the_sampled_completion(self, chat, chat_server):
        c = client_of(chat_server)
        model = prism_ext.load(chat[0])
        ids = model.tokenizer.encode(model.apply_chat_template(HELLO), add_special_tokens=False)
        kw = dict(model=name_of(chat[0]), max_tokens=6, temperature=1.3, top_p=0.9, seed=11, n=2)
        r = c.chat.completions.create(messages=HELLO, **kw)
        want = c.completions.create(prompt=ids, **kw)
        assert [ch.message.content for ch in r.choices] == [ch.text for ch in want.choices]
        assert [ch.index for ch in r.choices] == [0, 1]

    @pytest.mark.parametrize("messages,param", [
        ([], "messages"),
        ([{"content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": "hi"}, {"content": "x"}], "messages[1].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": 7}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "messages[0].content"),
        ([{"role": "user", "content": "hi", "colour": "red"}], "messages[0].colour"),
        (["hi"], "messages[0]"),
        ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}], "messages"),  # the template's
        ([{"role": "user", "content": "x" * 200}], "messages"),  # longer than the model's 128 positions
    ])
    def test_bad_messages_name_the_field(self, chat, chat_server, messages, param):
        with pytest.raises(openai.BadRequestError) as err:
            client_of(chat_server).chat.completions.create(model=name_of(chat[0]), messages=messages, max_tokens=4)
        assert (err.value.status_code, err.value.param) == (400, param), err.value.message
        assert err.value.message.startswith(f"Error code: 400 - {param}: ")

    def test_the_template_error_is_the_message(self, chat, chat_server):
        with pytest.raises(openai.BadRequestError, match="a system message must come first"):
            client_of(chat_server).chat.completions.create(
                model=name_of(chat[0]), max_tokens=4,
                messages=[{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}])

    @pytest.mark.parametrize("kw,param", [
        ({"max_tokens": 33}, "max_tokens"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 4, "max_completion_tokens": 4}, "max_completion_tokens"),
        ({"logprobs": True}, "logprobs"), ({"stop": ["", "a"]}, "stop"), ({"n": 0}, "n"),
    ])
    def test_bad_settings_name_the_field(self, chat, chat_server, kw, param):
        with pytest.raises(openai.BadRequestError) as err:
            client_of(chat_server).chat.completions.create(model=name_of(chat[0]), messages=HELLO, **kw)
        assert err.value.param == param, err.value.message

    def test_max_completion_tokens_is_max_tokens(self, chat, chat_server):
        c = client_of(chat_server)
        a = c.chat.completions.create(model=name_of(chat[0]), messages=HELLO, max_completion_tokens=2)
        assert a.usage.completion_tokens == 2 and a.choices[0].finish_reason == "length"


def test_a_checkpoint_without_a_chat_template_is_refused(gpt_server):  # noqa: F811  (gpt2-tiny)
    c = client_of(gpt_server)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="gpt2-tiny", messages=HELLO, max_tokens=4)
    assert err.value.param == "model" and "no chat template" in err.value.message
    assert "chat_template" in err.value.message  # says where one would be found
    models = gpt_server.client.get("/v1/models").json()["data"][0]["prism"]["endpoints"]
    assert "completions" in models and "chat/completions" not in models
