"""A checkpoint's tokenizer, called the way transformers users call one.

Every ``tokenizer.json`` (BERT WordPiece, GPT-2 byte-level BPE, the bundled
``gpt2-tiny``'s byte-level vocabulary with no merges) is read by the
``tokenizers`` package; :class:`Tokenizer` adds what a transformers
tokenizer does around it::

    enc = m.tokenizer(["a text", "another"], return_tensors="pt", padding=True, truncation=True, max_length=64)
    out = m(**enc)                      # input_ids, attention_mask (+ token_type_ids for BERT)
    m.tokenizer.batch_decode(ids, skip_special_tokens=True)

Special tokens are added by default, as transformers does (BERT's [CLS] ...
[SEP]; GPT-2 adds none). ``tokenizer_config.json`` and
``special_tokens_map.json`` next to ``tokenizer.json`` give the pad/eos/...
tokens, ``model_max_length``, ``padding_side`` and ``truncation_side``.

Padding: a tokenizer with no pad token pads with its eos token, or with id 0
when it has neither (GPT-2 checkpoints have no pad token; transformers would
refuse, and users then set ``tok.pad_token = tok.eos_token``). The padded
positions carry ``attention_mask`` 0, so the model never reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["Tokenizer", "BatchEncoding", "load_tokenizer", "gguf_tokenizer", "byte_level_tokenizer_json", "check_text"]

_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_VERY_LARGE = int(1e30)  # transformers' model_max_length when a checkpoint states none


def check_text(text) -> str:
    """``text`` as a str that encodes as UTF-8. A command line with invalid
    UTF-8 bytes reaches Python as lone surrogates, which no tokenizer can take."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text: is not valid UTF-8 (undecodable byte at character {exc.start}); "
                         "pass the text in UTF-8") from None
    return text


class BatchEncoding(dict):
    """What a tokenizer call returns: a dict of model inputs with attribute
    access (``enc.input_ids``), usable as ``m(**enc)`` or ``m(enc)``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"this encoding has no {name!r} (it has {', '.join(self)})") from None


def _token_content(value) -> str | None:
    """A special-token entry of tokenizer_config.json: a str or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with transformers' calling conventions.

    ``model_input_names``: the fields a call returns (the model's inputs:
    GPT-2 takes no ``token_type_ids``)."""

    def __init__(self, tok, config: dict | None = None,
                 model_input_names=("input_ids", "token_type_ids", "attention_mask")):
        # tokenizer.json may fix padding/truncation; here a call's arguments decide, as in transformers.
        tok.no_padding()
        tok.no_truncation()
        self.backend = tok
        config = dict(config or {})
        self.model_input_names = tuple(config.get("model_input_names") or model_input_names)
        limit = config.get("model_max_length")
        self.model_max_length = int(limit) if isinstance(limit, (int, float)) and 0 < limit < _VERY_LARGE \
            else _VERY_LARGE
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        for side in ("padding_side", "truncation_side"):
            if getattr(self, side) not in ("left", "right"):
                raise ValueError(f"tokenizer_config.json: {side} must be 'left' or 'right', got {getattr(self, side)!r}")
        self._truncating = {}
        # the checkpoint's chat template (tokenizer_config.json, chat_template.jinja or a GGUF's
        # tokenizer.chat_template), rendered by apply_chat_template
        template = config.get("chat_template")
        self.chat_template = template if isinstance(template, str) and template else None
        # special tokens the vocabulary does not hold are left out (transformers would add them)
        self._special = {name: token for name in _SPECIAL
                         if (token := _token_content(config.get(name))) is not None and tok.token_to_id(token) is not None}

    # -- special tokens: set like transformers (tok.pad_token = tok.eos_token)
    def __setattr__(self, name, value):
        if name in _SPECIAL:
            if value is not None and self.backend.token_to_id(value) is None:
                raise ValueError(f"{name}: {value!r} is not in the vocabulary")
            self._special[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):  # only for names not found the usual way
        special = self.__dict__.get("_special", {})
        if name in _SPECIAL:
            return special.get(name)
        if name.endswith("_token_id") and name[:-3] in _SPECIAL:
            token = special.get(name[:-3])
            return None if token is None else self.backend.token_to_id(token)
        raise AttributeError(name)

    @property
    def vocab_size(self) -> int:
        """The base vocabulary (as transformers: without added tokens; ``len(tok)`` counts them)."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The special tokens that are set, by name (``{"eos_token": "<|im_end|>", ...}``), as transformers'."""
        return {name: token for name, token in self._special.items() if token is not None}

    @property
    def all_special_ids(self) -> list[int]:
        ids = {self.backend.token_to_id(t) for t in self._special.values() if t is not None}
        ids |= {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        return sorted(i for i in ids if i is not None)

    def _pad_id(self) -> int:
        for token in (self.pad_token, self.eos_token):
            if token is not None:
                return self.backend.token_to_id(token)
        return 0

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
                f"special={ {k: v for k, v in self._special.items() if v is not None} })")

    # -- encoding
    def _backend(self, truncate_to: int | None):
        """The backend, or a copy of it that truncates to ``truncate_to`` (the
        tokenizers package keeps the special tokens, as transformers does). Copies
        are cached: the shared backend is never reconfigured, so calls may run
        on several threads."""
        if truncate_to is None:
            return self.backend
        key = (truncate_to, self.truncation_side)
        tok = self._truncating.get(key)
        if tok is None:
            from tokenizers import Tokenizer as Backend

            tok = Backend.from_str(self.backend.to_str())
            tok.enable_truncation(truncate_to, direction=self.truncation_side)
            self._truncating[key] = tok
        return tok

    def __call__(self, text, *, add_special_tokens: bool = True, padding=False, truncation=None,
                 max_length: int | None = None, return_tensors: str | None = None,
                 return_attention_mask: bool | None = None, return_token_type_ids: bool | None = None,
                 pad_to_multiple_of: int | None = None) -> BatchEncoding:
        """Encode a text or a list of texts. ``padding``: False, True/"longest",
        or "max_length"; ``truncation``: True cuts to ``max_length`` (or the
        model's maximum); ``return_tensors``: None (lists), "pt" or "np"."""
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text: expected a str or a list of str, got {type(text).__name__}")
        if not texts:
            raise ValueError("text: the list of texts is empty")
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding: expected False, True, 'longest' or 'max_length', got {padding!r}")
        if truncation not in (None, False, True, "longest_first", "only_first", "do_not_truncate"):
            raise ValueError(f"truncation: expected True or False, got {truncation!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"max_length: expected an int >= 1, got {max_length!r}")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors: expected None, 'pt' or 'np', got {return_tensors!r}")
        if truncation is None:  # transformers: max_length alone truncates (unless it is the padding length)
            truncation = max_length is not None and padding != "max_length"
        truncate_to = None
        if truncation not in (False, "do_not_truncate"):
            truncate_to = max_length if max_length is not None else self.model_max_length
        if truncate_to is not None and truncate_to >= _VERY_LARGE:
            truncate_to = None
        encs = self._backend(truncate_to).encode_batch([check_text(t) for t in texts],
                                                       add_special_tokens=add_special_tokens)
        rows = [(list(e.ids), list(e.type_ids)) for e in encs]

        if padding in (True, "longest"):
            target = max(len(ids) for ids, _ in rows)
        elif padding == "max_length":
            target = max_length if max_length is not None else self.model_max_length
            if target >= _VERY_LARGE:
                raise ValueError("max_length: padding='max_length' needs max_length (the model states no maximum)")
        else:
            target = None
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        fields = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
        pad = self._pad_id()
        for ids, types in rows:
            mask = [1] * len(ids)
            room = max(0, target - len(ids)) if target is not None else 0
            if room:
                fill = ([pad] * room, [0] * room, [0] * room)
                ids, types, mask = ((f + x if self.padding_side == "left" else x + f)
                                    for f, x in zip(fill, (ids, types, mask)))
            fields["input_ids"].append(list(ids))
            fields["token_type_ids"].append(list(types))
            fields["attention_mask"].append(list(mask))
        wanted = [name for name in fields if name in self.model_input_names or name == "input_ids"]
        if return_attention_mask is not None:
            wanted = [n for n in wanted if n != "attention_mask"] + (["attention_mask"] if return_attention_mask else [])
        if return_token_type_ids is not None:
            wanted = [n for n in wanted if n != "token_type_ids"] + (["token_type_ids"] if return_token_type_ids else [])
        out = BatchEncoding()
        for name in ("input_ids", "token_type_ids", "attention_mask"):
            if name not in wanted:
                continue
            value = fields[name]
            if return_tensors is not None:
                if len({len(v) for v in value}) > 1:
                    raise ValueError("padding: the texts have different lengths; pass padding=True to return "
                                     "them as one tensor")
                import numpy as np

                value = np.array(value, dtype=np.int64)
                if return_tensors == "pt":
                    import torch

                    value = torch.from_numpy(value)
            elif single:
                value = value[0]
            out[name] = value
        return out

    def encode(self, text: str, add_special_tokens: bool = True, *, truncation=None,
               max_length: int | None = None) -> list[int]:
        """The ids of one text (special tokens added by default, as transformers does)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return self(text, add_special_tokens=add_special_tokens, truncation=truncation,
                    max_length=max_length)["input_ids"]

    # -- decoding
    @staticmethod
    def _ids(ids) -> list[int]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            return [ids]
        try:
            return [int(i) for i in ids]
        except (TypeError, ValueError):
            raise TypeError("ids: expected a sequence of ints or a 1-d tensor") from None

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = self._ids(ids)
        size = len(self)
        bad = next((i for i in ids if not 0 <= i < size), None)
        if bad is not None:
            raise ValueError(f"ids: {bad} is outside the vocabulary (0..{size - 1})")
        if skip_special_tokens:  # pad/eos set on this object are special even when the backend does not know it
            specials = set(self.all_special_ids)
            ids = [i for i in ids if i not in specials]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in self._ids(ids)]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self.backend.encode(check_text(text), add_special_tokens=add_special_tokens).tokens

    # -- chat
    def apply_chat_template(self, messages, *, add_generation_prompt: bool = False, tokenize: bool = True,
                            **extra):
        """``messages`` ([{"role": ..., "content": ...}, ...]) rendered with the
        checkpoint's chat template as transformers renders it (jinja2, a
        sandbox, ``trim_blocks`` and ``lstrip_blocks``, the special tokens
        and ``extra`` as variables); the ids of the text (``tokenize=True``,
        no special tokens added: the template writes them) or the text."""
        from .chat import render_chat

        if self.chat_template is None:
            raise ValueError("chat_template: this checkpoint has no chat template (no chat_template in its "
                             "tokenizer_config.json, no chat_template.jinja, none in the GGUF metadata)")
        specials = {name: token for name, token in self._special.items() if token is not None}
        text = render_chat(self.chat_template, messages, {**specials, **extra}, add_generation_prompt)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), 256))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_level_tokenizer_json() -> dict:
    """tokenizer.json of a byte-level BPE with no merges where id = byte value
    (the bundled gpt2-tiny's vocabulary): one token per UTF-8 byte."""
    table = _bytes_to_unicode()
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {table[b]: b for b in range(256)}, "merges": []},
    }


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"tokenizer: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"tokenizer: {path} must hold a JSON object")
    return data


# tokenizer.ggml.pre -> how llama.cpp splits text before BPE, as a tokenizers pre-tokenizer
# (llama.cpp's llama-vocab.cpp; transformers' integrations/gguf for the same names)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2 = ("default", "gpt2")  # GPT-2's own split (the ByteLevel pre-tokenizer's regex)
_DIGITS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")  # each digit alone, then GPT-2's
_SPLITS = {**dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "pixtral"), _LLAMA3_SPLIT),
           **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT)}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _gguf_pre_tokenizer(pre, path):
    from tokenizers import Regex, pre_tokenizers

    if pre is None or pre in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    known = ", ".join(sorted(_GPT2 + _DIGITS + tuple(_SPLITS)))
    raise ValueError(f"tokenizer: {path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {known})")


def gguf_tokenizer(path, model_input_names=("input_ids", "attention_mask")) -> Tokenizer:
    """The tokenizer a GGUF file describes (``tokenizer.ggml.*``): a
    byte-level BPE (``tokenizer.ggml.model`` ``gpt2``, the Llama 3, Qwen2 and
    SmolLM2 kind) built with the tokenizers package: the vocabulary and
    merges, control tokens as special added tokens and user-defined ones as
    plain added tokens, llama.cpp's pre-tokenizer split for
    ``tokenizer.ggml.pre``, BOS/EOS added as ``add_bos_token`` /
    ``add_eos_token`` say; its special tokens and
    ``tokenizer.chat_template``. Other tokenizer models (sentencepiece
    ``llama``, ...) are refused by name."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, processors
    from tokenizers.models import BPE

    from .gguf import metadata, open_gguf

    meta = metadata(open_gguf(path), path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer: {path}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, "
                         f"the byte-level BPE of Llama 3, Qwen2 and SmolLM2)")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type") or []
    merges = [] if merges is None else merges  # a byte-level vocabulary may have no merges
    for key, value in (("tokens", tokens), ("merges", merges)):
        if not isinstance(value, list) or not (value or key == "merges") or not all(isinstance(v, str) for v in value):
            raise ValueError(f"tokenizer: {path}: tokenizer.ggml.{key} must be a list of strings")
    if not isinstance(types, list) or (types and len(types) != len(tokens)):
        raise ValueError(f"tokenizer: {path}: tokenizer.ggml.token_type must give one type per token")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((i for i, p in enumerate(pairs) if len(p) != 2), None)
    if bad is not None:
        raise ValueError(f"tokenizer: {path}: tokenizer.ggml.merges[{bad}] is {merges[bad]!r}, not two tokens")
    # A token spelled outside the byte alphabet (a control token some files store as text) is respelled
    # byte by byte, as transformers does.
    table = _bytes_to_unicode()
    alphabet = set(table.values())
    spelled = [t if set(t) <= alphabet else "".join(table[b] for b in t.encode("utf-8")) for t in tokens]
    backend = Backend(BPE({t: i for i, t in enumerate(spelled)}, pairs, dropout=None, continuing_subword_prefix="",
                          end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre"), path)
    backend.decoder = decoders.ByteLevel()
    # control tokens whose spelling leaves the byte alphabet are llama.cpp mislabels; transformers skips them too
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, types) if kind == _CONTROL and set(t) <= alphabet])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
    config = {"model_max_length": meta.get(f"{meta.get('general.architecture')}.context_length")}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(tokens):
            config[name] = tokens[index]
    add_bos, add_eos = (meta.get(f"tokenizer.ggml.add_{k}_token") is True for k in ("bos", "eos"))
    for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        if flag and name not in config:
            raise ValueError(f"tokenizer: {path}: tokenizer.ggml.add_{name[:3]}_token is set, but the file names "
                             f"no {name[:3]} token id")
    if add_bos or add_eos:  # transformers' update_post_processor
        bos, eos = config.get("bos_token"), config.get("eos_token")
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        special = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                               special_tokens=list(dict.fromkeys(special)))
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    try:
        return Tokenizer(backend, config, model_input_names)
    except ValueError as exc:
        raise ValueError(f"tokenizer: {path}: {exc}") from None


def load_tokenizer(directory, model_input_names=("input_ids", "token_type_ids", "attention_mask")) -> Tokenizer:
    """The tokenizer of a checkpoint directory: its ``tokenizer.json`` with
    ``tokenizer_config.json`` and ``special_tokens_map.json`` when present."""
    from tokenizers import Tokenizer as Backend

    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: {directory} has no tokenizer.json; so text cannot be encoded; "
                                f"copy the checkpoint's tokenizer.json there (from Python, pass input_ids instead)")
    try:
        backend = Backend.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception type
        raise ValueError(f"tokenizer: {path} could not be read ({str(exc).splitlines()[0][:200]})") from None
    from .chat import read_chat_template

    config = {**_read_json(directory / "special_tokens_map.json"), **_read_json(directory / "tokenizer_config.json")}
    config["chat_template"] = read_chat_template(directory)  # chat_template.jinja first, as transformers reads it
    try:
        return Tokenizer(backend, config, model_input_names)
    except ValueError as exc:
        raise ValueError(f"tokenizer: {directory}: {exc}") from None
