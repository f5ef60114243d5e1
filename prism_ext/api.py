"""``prism_ext.load(path)``: the model face. A :class:`PrismModel` plans
each call (:func:`prism_ext.executor.request.plan`) and hands it to its
executor: P simulated devices in this process by default, or a live
cluster's processes (:func:`prism_ext.cluster`)."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .method.engine import ExactRows, GenerateOptions, RunStats
from .models import Network, load_network
from .models.quant import check_weight_dtype
from .options import RunOptions, run_options
from .executor import Executor, InProcess
from .executor.request import plan, run_stats

__all__ = ["load", "PrismModel", "PrismOutput"]


class PrismOutput(Mapping):
    """HF-like output: attribute and key access to the fields the head
    provides (``logits``, ``last_hidden_state``, ``pooler_output``), plus
    ``stats`` (:class:`prism_ext.method.engine.RunStats`)."""

    def __init__(self, fields: dict[str, torch.Tensor], stats: RunStats):
        self._fields = fields
        self.stats = stats

    def __getattr__(self, name):
        try:
            return self.__dict__["_fields"][name]
        except KeyError:
            raise AttributeError(f"this output has no {name!r} (it has {', '.join(self._fields)})") from None

    def __getitem__(self, key):
        return self._fields[key]

    def __iter__(self):
        return iter(self._fields)

    def __len__(self):
        return len(self._fields)

    def __repr__(self):
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self._fields.items())
        return f"PrismOutput({shapes})"


class PrismModel:
    """A checkpoint loaded for PRISM inference; see :func:`load`."""

    def __init__(self, net: Network, directory: Path | None = None, executor: Executor | None = None):
        self.net = net
        self.executor = InProcess() if executor is None else executor
        self.config = net.config
        self.model_type = net.model_type
        self.directory = directory
        self.image_processor_config = None
        if directory is not None and (directory / "preprocessor_config.json").is_file():
            self.image_processor_config = json.loads((directory / "preprocessor_config.json").read_text())

    @functools.cached_property
    def special_ids(self) -> tuple[int, ...]:
        """Token ids of the special tokens: ``*_token_id`` of config.json and
        the tokenizer's special tokens (when the checkpoint has a
        tokenizer.json). Empty for image models."""
        if "input_ids" not in self.net.input_names:
            return ()
        ids = {v for k, v in self.config.items() if k.endswith("_token_id") and isinstance(v, int)
               and not isinstance(v, bool) and v >= 0}
        if self.directory is not None and (self.directory.is_file() or (self.directory / "tokenizer.json").is_file()):
            ids |= set(self.tokenizer.all_special_ids)  # a GGUF file always describes its tokenizer
        return tuple(sorted(ids))

    def exact_rows(self, spec) -> ExactRows:
        """Resolve an ``exact_rows`` spec (see :meth:`ExactRows.parse`; ``default``:
        the family's) for this model."""
        return ExactRows.parse(self.net.resolve("exact_rows", spec), self.special_ids)

    @functools.cached_property
    def eos_ids(self) -> tuple[int, ...]:
        """The end-of-sequence ids :meth:`generate` stops at by default: the
        checkpoint's ``eos_token_id`` (one or a list) from
        generation_config.json, else config.json, for the families that
        declare one (Llama, Qwen, Mistral); none for GPT-2, as before."""
        if self.net.defaults.get("eos") is not True:
            return ()
        found = self.config.get("eos_token_id")
        path = None if self.directory is None else self.directory / "generation_config.json"
        if path is not None and path.is_file():
            from .models import read_json

            gen = read_json(path, "generation_config.json")
            if isinstance(gen, dict) and gen.get("eos_token_id") is not None:
                found = gen["eos_token_id"]
        found = [found] if isinstance(found, int) else found
        if not isinstance(found, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                  for v in found):
            return ()
        return tuple(dict.fromkeys(found))

    @functools.cached_property
    def tokenizer(self):
        """The checkpoint's tokenizer (:class:`prism_ext.inputs.tokenizer.Tokenizer`),
        called like a transformers one: ``m.tokenizer(texts, return_tensors="pt",
        padding=True)`` gives the inputs this model takes; read on first use
        (tokenizer.json, or a GGUF file's metadata). Its ``chat_template`` and
        ``apply_chat_template`` render a chat."""
        from .inputs.tokenizer import gguf_tokenizer, load_tokenizer

        if self.directory is None:
            raise ValueError("tokenizer: this model has no checkpoint directory to read tokenizer.json from")
        if self.directory.is_file():  # a GGUF checkpoint (models.resolve)
            return gguf_tokenizer(self.directory, model_input_names=self.net.input_names)
        return load_tokenizer(self.directory, model_input_names=self.net.input_names)

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's chat template (Jinja), or None when it has none
        (or no tokenizer): its tokenizer's (``chat_template.jinja``, else
        ``tokenizer_config.json``'s ``chat_template``, its ``default`` when it
        names several; a GGUF file's ``tokenizer.chat_template``)."""
        try:
            return self.tokenizer.chat_template
        except FileNotFoundError:  # no tokenizer.json: no text, so no chat either
            return None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """``messages`` ([{"role": "user", "content": "..."}, ...]) as the
        prompt text of :attr:`chat_template`, rendered as transformers'
        ``tokenizer.apply_chat_template(messages, tokenize=False)`` renders
        it (``m.tokenizer.apply_chat_template`` gives the ids). Encode the
        text with ``tokenizer.encode(text, add_special_tokens=False)``: the
        template writes the special tokens itself. Needs jinja2."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    @functools.cached_property
    def sentence_pooling(self):
        """How :meth:`embed` pools token rows into one embedding
        (:class:`prism_ext.inputs.pooling.SentencePooling`): the checkpoint's
        sentence-transformers pipeline when it has a ``modules.json`` (its
        ``1_Pooling`` modes, and unit length after a ``Normalize``), else the
        mean over valid tokens; read on first use."""
        from .inputs.pooling import SentencePooling

        return SentencePooling.from_folder(self.directory)

    @torch.no_grad()
    def embed(self, inputs=None, *, devices: int | None = None, options: RunOptions | None = None,
              **kwargs) -> PrismOutput:
        """Sentence embeddings as sentence-transformers makes them for this
        checkpoint (:attr:`sentence_pooling`), from a run over ``devices``
        devices (arguments as for a call; ``outputs`` is chosen here: only
        the rows' sums and counts travel for mean pooling). Returns a
        PrismOutput with ``embeddings`` [B, D] and ``stats``."""
        inputs, options = self.split_arguments(inputs, options, kwargs)
        pooling = self.sentence_pooling
        out = self(inputs, devices=devices, options=options.replace(outputs=pooling.outputs))
        batch, n = self.net.check_inputs(inputs)
        mask = inputs.get("attention_mask")
        if mask is None:  # every position is valid (image patches too)
            mask = torch.ones(batch, n, dtype=torch.long)
        if "mean_pooled" in out:
            emb = pooling.from_means(out.mean_pooled, mask.sum(1))
        else:
            emb = pooling(out.last_hidden_state, mask)
        return PrismOutput({"embeddings": emb}, out.stats)

    @functools.cached_property
    def image_processor(self):
        """The checkpoint's image processor (:class:`prism_ext.inputs.images.ImageProcessor`,
        from its ``preprocessor_config.json``): ``m.image_processor(images)``
        gives ``{"pixel_values": ...}`` for paths, bytes, PIL images or arrays."""
        from .inputs.images import ImageProcessor

        if self.model_type != "vit":
            raise ValueError(f"image: this is a {self.model_type} model; images need a vit model")
        if self.image_processor_config is None:
            raise ValueError(f"image: {self.directory} has no preprocessor_config.json")
        return ImageProcessor(self.image_processor_config, self.net.channels, self.net.image)

    def __repr__(self):
        return f"PrismModel({self.model_type}, head={self.net.head}, layers={len(self.net.blocks)}, d={self.net.d})"

    def _inputs(self, inputs, kwargs: dict) -> dict:
        given = {}
        if inputs is not None:
            if isinstance(inputs, torch.Tensor):
                given[self.net.input_names[0]] = inputs
            elif isinstance(inputs, Mapping):
                given.update(inputs)
            else:
                raise TypeError(f"inputs: expected a tensor or a mapping of tensors, got {type(inputs).__name__}")
        for name in self.net.input_names:
            if name in kwargs:
                if name in given:
                    raise ValueError(f"{name}: given twice (in inputs and as a keyword)")
                given[name] = kwargs.pop(name)
        if kwargs:
            name = next(iter(kwargs))
            raise TypeError(f"{name}: unexpected keyword argument ({self.model_type} takes "
                            f"{', '.join(self.net.input_names)} and the run options)")
        unknown = set(given) - set(self.net.input_names)
        if unknown:
            raise ValueError(f"inputs: {self.model_type} takes {', '.join(self.net.input_names)}; "
                             f"got unexpected {', '.join(sorted(unknown))}")
        given = {k: v for k, v in given.items() if v is not None}
        if self.net.input_names[0] not in given:
            raise ValueError(f"inputs: {self.net.input_names[0]} is required")
        return given

    def with_executor(self, executor: Executor) -> "PrismModel":
        """This model (the same network, tokenizer and files) with its calls
        run by ``executor`` (:func:`prism_ext.cluster` binds one to a cluster)."""
        other = copy.copy(self)
        other.executor = executor
        return other

    def close(self) -> None:
        """Stop the executor's devices (a cluster's processes); the in-process ones need nothing."""
        self.executor.close()

    def __enter__(self) -> "PrismModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def __call__(self, inputs=None, *, devices: int | None = None, options: RunOptions | None = None,
                 **kwargs) -> PrismOutput:
        """Run the model over ``devices`` devices: threads of this process
        (default 1), or the processes of the cluster this model is bound to
        (:func:`prism_ext.cluster`; default all of them, 1: rank 0 alone).

        ``inputs``: what the HF model takes (``input_ids`` [+ ``attention_mask``,
        ``token_type_ids``] or ``pixel_values``), as a mapping, a tensor (the
        first of those) or keywords. How it runs: ``options``
        (:class:`prism_ext.RunOptions`) and/or its fields as keywords, e.g.
        ``m(ids, devices=4, cr=4, mode="voltage", wire_dtype="int8",
        exact_rows="special", outputs=("pooled",))``; see RunOptions for each.
        """
        inputs, options = self.split_arguments(inputs, options, kwargs)
        devices, options = self.executor.resolve(devices, options)
        request = plan(self.net, inputs, options, devices=devices, special_ids=self.special_ids)
        collected = self.executor.execute(self.net, inputs, request)
        return PrismOutput(collected.fields, run_stats(request, collected))

    @torch.no_grad()
    def generate(self, input_ids, *, devices: int | None = None, options: RunOptions | None = None,
                 max_new_tokens: int = 20, temperature: float = 0.0, top_k: int | None = None,
                 seed: int | None = None, eos_token_id=None, return_stats: bool = False,
                 on_token=None, top_p: float | None = None, **kwargs):
        """GPT-2 generation: distributed prefill over ``devices``, then decoding
        on the last device from its kept K/V (own rows and earlier partitions'
        means), with no communication per generated token. ``options`` and
        keywords as for a call (mode prism or single). ``on_token``: called
        with each step's new tokens [B] as the last device picks them (it
        streams them to rank 0).

        ``temperature`` 0 is greedy; > 0 samples from softmax(logits / T),
        restricted to the ``top_k`` most likely tokens, then to the ``top_p``
        nucleus, if given (as transformers composes them), row b of the
        batch with a ``torch.Generator`` seeded by
        ``prism_ext.method.engine.sample_seed(seed, b)`` (row 0: ``seed``
        itself), so the rows of a repeated prompt are independent samples.
        Sequences that emit one of ``eos_token_id`` (an id or a sequence of
        ids; None: the checkpoint's, :attr:`eos_ids`; ``()``: never stop)
        continue with the first of them (like HF padding with eos) and
        decoding ends when every sequence has. Returns the ids
        [B, N + new tokens], and with ``return_stats`` also
        ``(prefill RunStats, DecodeStats)`` (per generated token after the first).
        """
        if eos_token_id is None:
            eos_token_id = self.eos_ids or None
        elif isinstance(eos_token_id, (list, tuple)) and not eos_token_id:
            eos_token_id = None
        sampling = GenerateOptions(max_new_tokens, temperature, top_k, seed, eos_token_id, on_token is not None,
                                   top_p)
        devices, options = self.executor.resolve(devices, run_options(options, **kwargs))
        inputs, request = self._generate_request(input_ids, devices, options, sampling)
        collected = self.executor.execute(self.net, inputs, request, on_token)
        ids = torch.cat([inputs["input_ids"].long(), collected.tokens], dim=1)
        return (ids, run_stats(request, collected), collected.decode) if return_stats else ids

    def split_arguments(self, inputs, options: RunOptions | None, kwargs: dict) -> tuple[dict, RunOptions]:
        """A call's keywords: the model's input names go to the inputs, the
        rest must be run options; returns the checked (inputs, options)."""
        names = set(RunOptions.fields())
        changes = {k: v for k, v in kwargs.items() if k in names}
        return self._inputs(inputs, {k: v for k, v in kwargs.items() if k not in names}), \
            run_options(options, **changes)

    def _generate_request(self, input_ids, devices: int, options: RunOptions, sampling: GenerateOptions):
        """The checked (inputs, Request) of a generation."""
        if self.net.head != "lm":
            raise ValueError(f"generate: needs a language model head; this is {self.model_type} ({self.net.head})")
        inputs = self._inputs(input_ids, {})
        if "attention_mask" in inputs:
            raise ValueError("input_ids: generate takes unpadded input_ids only")
        batch, n = self.net.check_inputs(inputs)
        if n + sampling.max_new_tokens > self.net.n_positions:
            raise ValueError(f"max_new_tokens: {n} + {sampling.max_new_tokens} positions exceed "
                             f"n_positions={self.net.n_positions}")
        request = plan(self.net, inputs, options, devices=devices, special_ids=self.special_ids, generate=sampling)
        return inputs, request


def _from_transformers(model) -> PrismModel:
    """A transformers ``PreTrainedModel`` (GPT2LMHeadModel, BertModel,
    ViTForImageClassification, ...): its config and weights, and its folder
    (``name_or_path``) for the tokenizer and image processor when it is local."""
    from .models import build_network

    config = model.config.to_dict()
    tensors = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    net = build_network(config, tensors, f"the {type(model).__name__} object")
    folder = Path(str(getattr(model, "name_or_path", "") or "")).expanduser()
    return PrismModel(net, folder if folder.is_dir() else None)


CALIBRATION_TOKENS = 200_000  # what GPTQ reads at most (about 2,600 paragraphs; measured in bench/RESULTS.md)
CALIBRATION_LENGTH = 256  # tokens of one calibration text at most: more texts in the budget (512: 0.9894 for 0.9903)


def load(path_or_name, weight_dtype: str = "fp32", calibration: Iterable[str] | None = None) -> PrismModel:
    """Load a checkpoint: a bundled model's name (``gpt2-tiny``,
    ``vit-tiny-digits``; see ``prism zoo list``), a Hugging Face checkpoint
    (gpt2, bert, vit, llama, qwen2, qwen3, mistral) in a local directory
    (config.json + safetensors or pytorch_model.bin; tokenizer when present),
    a checkpoint written by :func:`prism_ext.models.write_quantized`, or a
    transformers model object (its weights as they are in memory). Never
    downloads: a hub name must already be in the local HF cache.

    ``weight_dtype``: how the weights are held (``fp32``, ``bf16``, ``int8``,
    ``int4``: :mod:`prism_ext.models.quant`); every device of a cluster holds
    the same (the handshake checks it). A quantized checkpoint loads as it was
    written (``weight_dtype`` must be fp32, the default, or its own).

    ``calibration`` (int4 only): texts like those the model will see; the
    int4 codes of every block matrix are then chosen by GPTQ for them
    (:func:`prism_ext.models.quant.gptq_int4`) rather than rounded to
    nearest. The texts run once through the float32 model on one device (at
    most :data:`CALIBRATION_TOKENS` tokens, each text cut to
    :data:`CALIBRATION_LENGTH`): a one-off step on a workstation, whose
    result is written with ``prism quantize`` and loaded by the boards."""
    check_weight_dtype(weight_dtype)
    if calibration is not None and weight_dtype != "int4":
        raise ValueError(f"calibration: chooses int4 codes; weight_dtype {weight_dtype!r} has none to choose")
    if hasattr(path_or_name, "state_dict") and hasattr(getattr(path_or_name, "config", None), "to_dict"):
        model = _from_transformers(path_or_name)
    else:
        model = PrismModel(*load_network(path_or_name))
    if weight_dtype not in ("fp32", model.net.weight_dtype):
        hessians = None if calibration is None else _input_hessians(model, calibration)
        model.net.quantize(weight_dtype, hessians=hessians)
    elif calibration is not None:
        raise ValueError(f"calibration: the checkpoint is already {model.net.weight_dtype}; calibrate from its "
                         f"float32 source")
    return model


def _input_hessians(model: PrismModel, texts: Iterable[str]) -> dict:
    """``X^T X`` of every block matrix's inputs over ``texts`` (one device, float32)."""
    if isinstance(texts, str):
        raise TypeError("calibration: expected a list of texts, got one str")
    if "input_ids" not in model.net.input_names:
        raise ValueError(f"calibration: {model.model_type} takes no text; calibration is for text models (int4 "
                         f"without it rounds to nearest)")
    length = min(CALIBRATION_LENGTH, model.net.n_positions)

    def run():
        seen = 0
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"calibration[{i}]: expected a non-blank str, got {text!r:.40}")
            ids = model.tokenizer(text, truncation=True, max_length=length, return_tensors="pt")
            model(dict(ids), devices=1, outputs=("last",))
            seen += ids["input_ids"].numel()
            if seen >= CALIBRATION_TOKENS:
                return

    hessians, rows = model.net.record_inputs(run)
    if rows == 0:
        raise ValueError("calibration: no text given")
    return hessians
