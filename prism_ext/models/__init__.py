"""Model families and the checkpoint loader (config.json + weights from a
local directory; nothing is ever downloaded)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import bert, gpt2, llama, vit
from .common import BLOCK_MATRICES, Block, Network, Weights

__all__ = ["Block", "Network", "FAMILIES", "load_network", "resolve", "read_json", "read_tensors", "write_checkpoint",
           "write_quantized", "skeleton_network"]

# model_type -> family module; one module may serve several model types (llama: Llama, Qwen2, Qwen3, Mistral)
FAMILIES = {t: m for m in (gpt2, bert, vit, llama) for t in getattr(m, "MODEL_TYPES", (m.MODEL_TYPE,))}

_SAFE = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"
_BIN = "pytorch_model.bin"
_BIN_INDEX = "pytorch_model.bin.index.json"


def _hub_cache_dirs() -> list[Path]:
    dirs = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]))
    home = os.environ.get("HF_HOME")
    dirs.append(Path(home) / "hub" if home else Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def resolve(path_or_name) -> Path:
    """A local checkpoint: a directory (the path itself), a GGUF file (the
    file, or the only ``*.gguf`` of a directory without config.json), a
    bundled model's name (prism_ext.zoo), or a hub name already in the local
    Hugging Face cache. Anything else is an error saying how to get it."""
    from .. import zoo  # the bundled names: a lookup table, no model code
    from ..inputs.gguf import gguf_in, is_gguf

    if not isinstance(path_or_name, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path_or_name).__name__}")
    if not str(path_or_name).strip():
        raise ValueError("path: is empty; expected a checkpoint directory or a bundled model name "
                         f"({', '.join(zoo.NAMES)})")
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return gguf_in(path) or path
    if not path.exists() and str(path_or_name) in zoo.NAMES:
        return zoo.model_dir(str(path_or_name))
    if is_gguf(path):
        return path
    if path.exists():
        raise ValueError(f"path: {str(path)!r} is a file but not a GGUF file; expected a checkpoint directory "
                         f"holding config.json, or a .gguf file")
    name = str(path_or_name)
    # A path (absolute, relative with ./ or ~, or nested) is never a hub name:
    # say it is missing instead of suggesting a download.
    if name.startswith((".", "/", "~", os.sep)) or name.count("/") > 1:
        raise FileNotFoundError(f"path: {name!r} does not exist (expected a checkpoint directory holding "
                                f"config.json)")
    if name.count("/") <= 1:
        for cache in _hub_cache_dirs():
            snapshots = cache / ("models--" + name.replace("/", "--")) / "snapshots"
            if snapshots.is_dir():
                found = sorted((p for p in snapshots.iterdir() if (p / "config.json").is_file()),
                               key=lambda p: p.stat().st_mtime)
                if found:
                    return found[-1]
    raise FileNotFoundError(
        f"path: {name!r} is not a local directory and not in the local Hugging Face cache. prism_ext never "
        f"downloads; on a machine with network run `huggingface-cli download {name} --local-dir DIR` "
        f"(or `save_pretrained(DIR)` from transformers), copy DIR here and pass its path."
    )


def _load_file(path: Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """``meta``: only names and shapes (storage-less tensors; safetensors reads the header alone)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            if not meta:
                return load_file(str(path))
            with safe_open(str(path), "pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # the loaders raise many types for a bad file
        # One line, and never torch's advice to retry with weights_only=False:
        # that would run whatever code the file holds.
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        if "weights_only" in str(exc):
            first = "not a plain tensor checkpoint (truncated, corrupt, or holding other objects)"
        raise ValueError(f"weights: {path} is corrupt or unreadable ({type(exc).__name__}: {first[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights: {path} does not hold a dict of tensors")
    return {k: torch.empty(v.shape, device="meta") for k, v in state.items()} if meta else state


# Real configs and shard indexes nest 3 or 4 levels; anything deeper is
# refused before code that walks it (json, digests) can exceed the recursion limit.
_MAX_JSON_DEPTH = 32


def _json_depth(value) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [v for item in level if isinstance(item, (dict, list))
                 for v in (item.values() if isinstance(item, dict) else item)]
    return depth - 1


def read_json(path: Path, what: str):
    """A checkpoint's JSON file, or one line ``what: PATH ...`` saying why not."""
    try:
        value = json.loads(path.read_text())
    except RecursionError:  # the parser itself ran out of stack
        value = None
        deep = True
    except ValueError as exc:  # also undecodable bytes
        raise ValueError(f"{what}: {path} is not valid JSON ({exc})") from None
    else:
        deep = _json_depth(value) > _MAX_JSON_DEPTH
    if deep:
        raise ValueError(f"{what}: {path} nests deeper than {_MAX_JSON_DEPTH} levels")
    return value


def _shard_path(directory: Path, shard, index: Path) -> Path:
    """A shard an index names: a relative path inside ``directory`` (no
    absolute path, no ``..``, no symlink that leads out of it). A snapshot of
    the Hugging Face cache links its files into the repository's blobs/,
    which is allowed too."""
    if not isinstance(shard, str) or not shard:
        raise ValueError(f"weights: {index} names a shard that is not a file name: {shard!r}")
    rel = Path(shard)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"weights: {index} names shard {shard!r} outside the checkpoint folder")
    path = directory / rel
    real, roots = path.resolve(), [directory.resolve()]
    if directory.parent.name == "snapshots":  # models--org--name/snapshots/REV -> models--org--name/blobs
        roots.append((directory.parent.parent / "blobs").resolve())
    if not any(real.is_relative_to(root) for root in roots):
        raise ValueError(f"weights: {index} names shard {shard!r}, which leads outside the checkpoint folder "
                         f"(to {real})")
    return path


def read_tensors(directory: Path, meta: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a checkpoint (single file or shards) and a name for
    errors; ``meta``: their names and shapes only."""
    for index_name in (_SAFE_INDEX, _BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(read_json(index, "weights")["weight_map"].values()), key=str)
            except (KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"weights: {index} is not a valid shard index ({exc})") from None
            paths = [_shard_path(directory, shard, index) for shard in shards]  # every name before any read
            tensors = {}
            for shard, path in zip(shards, paths):
                if not path.is_file():
                    raise FileNotFoundError(f"weights: shard {shard} listed in {index} is missing")
                tensors.update(_load_file(path, meta))
            return tensors, str(index)
    for name in (_SAFE, _BIN):
        if (directory / name).is_file():
            return _load_file(directory / name, meta), str(directory / name)
    raise FileNotFoundError(f"path: {directory} holds no {_SAFE}, {_BIN} or shard index")


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"path: {directory} has no config.json")
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise ValueError(f"config.json: {path} must hold a JSON object")
    return config


def build_network(config: dict, tensors: dict[str, torch.Tensor], source: str = "the checkpoint") -> Network:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"config.json: model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type].build(config, tensors, source)


def load_network(path_or_name) -> tuple[Network, Path]:
    """The network and where it was read from: a checkpoint directory, or a GGUF file."""
    directory = resolve(path_or_name)
    if directory.is_file():  # resolve names a file only for a GGUF checkpoint
        from . import gguf

        return gguf.load(directory), directory
    config = read_config(directory)
    if config.get("model_type") not in FAMILIES:  # fail before reading weights
        build_network(config, {})
    if (directory / QUANT_META).is_file():
        return _read_quantized(directory, config), directory
    tensors, source = read_tensors(directory)
    return build_network(config, tensors, source), directory


def skeleton_network(path_or_name) -> Network:
    """The network of a checkpoint with no weights read (storage-less
    tensors): its structure and sizes, for planning (``prism info --model``)."""
    directory = resolve(path_or_name)
    config = read_config(directory)
    if (directory / QUANT_META).is_file():
        shapes = read_json(directory / QUANT_META, QUANT_META).get("tensors") or {}
        tensors = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
        source = str(directory / QUANT_META)
    else:
        tensors, source = read_tensors(directory, meta=True)
    return build_network(config, tensors, source)


# A quantized checkpoint (write_quantized): the describing files of its source,
# QUANT_META (the weight dtype, and the source's tensor names and shapes, from
# which the family builds the network's structure without any weights), and
# QUANT_WEIGHTS: every tensor the engine runs, by attribute path, as stored.
QUANT_META = "prism_quantized.json"
QUANT_WEIGHTS = "prism_quantized.safetensors"
_QUANT_FORMAT = 1


def write_quantized(net: Network, like, out) -> Path:
    """Write the quantized ``net`` (loaded from the checkpoint ``like``) to
    ``out``, so that a board loads the small weights without ever holding
    the float32 file: ``prism_ext.load(out)`` gives the same network (the
    same weights digest). Returns ``out``."""
    from safetensors.torch import save_file

    like, out = resolve(like), Path(out)
    if net.weight_dtype == "fp32":
        raise ValueError("weight_dtype: this network is fp32; write it with write_checkpoint, or quantize it first")
    if out.resolve() == like.resolve():
        raise ValueError(f"out: {out} is the source checkpoint; choose another directory")
    if (like / QUANT_META).is_file():
        shapes = read_json(like / QUANT_META, QUANT_META)["tensors"]
    else:
        tensors, _ = _source_tensors(like, meta=True)
        shapes = {k: list(t.shape) for k, t in tensors.items()}
        del tensors
    out.mkdir(parents=True, exist_ok=True)
    written = _copy_describing_files(like, out)
    meta = {"format": _QUANT_FORMAT, "weight_dtype": net.weight_dtype, "int4_group": _int4_group(net),
            "tensors": shapes}
    (out / QUANT_META).write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in net.named_tensors().items()}, str(out / QUANT_WEIGHTS),
              metadata={"format": "pt"})
    for f in written + [out / QUANT_META, out / QUANT_WEIGHTS]:
        _as_created(f)
    return out


def _int4_group(net: Network) -> int:
    from .quant import INT4_GROUP, Int4

    for blk in net.blocks:
        if isinstance(blk.wqkv, Int4):
            return blk.wqkv.group
    return INT4_GROUP


def _read_quantized(directory: Path, config: dict) -> Network:
    from .quant import WEIGHT_DTYPES, Quantized, from_stored

    meta = read_json(directory / QUANT_META, QUANT_META)
    if not isinstance(meta, dict) or meta.get("format") != _QUANT_FORMAT:
        raise ValueError(f"{QUANT_META}: {directory} was written by another version of prism-ext (format "
                         f"{meta.get('format') if isinstance(meta, dict) else '?'}, expected {_QUANT_FORMAT})")
    dtype, group, shapes = meta.get("weight_dtype"), meta.get("int4_group"), meta.get("tensors")
    if dtype not in WEIGHT_DTYPES[1:] or isinstance(group, bool) or not isinstance(group, int) or group < 2 \
            or not isinstance(shapes, dict):
        raise ValueError(f"{QUANT_META}: {directory / QUANT_META} is malformed (weight_dtype {dtype!r}, "
                         f"int4_group {group!r})")
    try:  # the structure only: tensors without storage (torch's meta device) of the source's shapes
        skeleton = {k: torch.empty([int(n) for n in v], device="meta") for k, v in shapes.items()}
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{QUANT_META}: tensor shapes are malformed ({exc})") from None
    net = build_network(config, skeleton, str(directory / QUANT_META))
    stored = _load_file(directory / QUANT_WEIGHTS)
    source = str(directory / QUANT_WEIGHTS)

    def take(path: str, like: torch.Tensor) -> torch.Tensor:
        t = stored.get(path)
        if t is None:
            raise ValueError(f"weights: {source} has no tensor {path!r}")
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(f"weights: {path!r} is {tuple(t.shape)} in {source}, the config needs "
                             f"{tuple(like.shape)}")
        return t

    def quantized(path: str, like: torch.Tensor) -> Quantized:
        parts = {k[len(path) + 1:]: t for k, t in stored.items() if k.startswith(path + ".")}
        w = from_stored(dtype, parts, group) if parts else None
        if w is None or tuple(w.shape) != tuple(like.shape):
            raise ValueError(f"weights: {source} has no {dtype} weight {path!r} of shape {tuple(like.shape)}")
        return w

    done: dict[int, object] = {}
    for i, blk in enumerate(net.blocks):
        for name in BLOCK_MATRICES:
            setattr(blk, name, quantized(f"blocks.{i}.{name}", getattr(blk, name)))
    for name in sorted(net.quantized_tables):  # named_tensors' order: a tied table is stored under its first name
        w = getattr(net, name)
        if id(w) not in done:
            done[id(w)] = quantized(name, w)
        setattr(net, name, done[id(w)])
    for path, t in net.named_tensors().items():  # the rest: norms, biases, position tables, small heads
        if t.device.type == "meta":
            _set_path(net, path, take(path, t).to(torch.float32))
    net.weight_dtype = dtype
    return net


def _set_path(obj, path: str, value) -> None:
    """``obj.a.0.b = value`` for the path ``a.0.b`` (of Network.named_tensors),
    rebuilding a tuple on the way (a head's (weight, bias))."""
    head, _, rest = path.partition(".")
    if isinstance(obj, (list, tuple)):
        child = obj[int(head)]
        new = value if not rest else (_set_path(child, rest, value) or child)
        if isinstance(obj, list):
            obj[int(head)] = new
            return None
        return tuple(new if j == int(head) else v for j, v in enumerate(obj))
    child = getattr(obj, head)
    if not rest:
        setattr(obj, head, value)
        return None
    rebuilt = _set_path(child, rest, value)
    if rebuilt is not None:  # a tuple was rebuilt: put it back
        setattr(obj, head, rebuilt)
    return None


# Weights of this or another framework, stale once a checkpoint is rewritten.
# What a written checkpoint carries besides its weights: the files that describe
# the model and its inputs. Anything else of the source (training metrics, a
# fine-tuning report, a model card, other formats' weights) describes the
# source, not what is written.
_CHECKPOINT_FILES = frozenset((
    "config.json", "generation_config.json", "preprocessor_config.json", "chat_template.jinja",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"))


def _pipeline_dirs(like: Path) -> set[str]:
    """The sentence-transformers module folders (``1_Pooling``, ``2_Normalize``...) ``modules.json`` names."""
    try:
        modules = json.loads((like / "modules.json").read_text())
    except (OSError, ValueError):
        return set()
    return {m["path"] for m in modules if isinstance(m, dict) and isinstance(m.get("path"), str)
            and m["path"] and Path(m["path"]).name == m["path"] and (like / m["path"]).is_dir()}


def _as_created(path: Path) -> None:
    """Give a written file the mode a new file gets here (the user's umask),
    not the source's (a read-only package) nor a temporary file's (0600)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _source_tensors(like: Path, meta: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a checkpoint folder or of a GGUF file (dequantized,
    under their Hugging Face names), and a name for errors."""
    if like.is_file():  # resolve() names a file only for a GGUF checkpoint
        from . import gguf

        config, tensors, rope_factors = gguf.read(like)
        if rope_factors is not None:  # a checkpoint's config would have to state llama.cpp's divisors
            raise ValueError(f"like: {like} scales RoPE by llama.cpp's rope_freqs divisors, which a Hugging Face "
                             f"checkpoint cannot state; run it from the GGUF file")
        return tensors, str(like)
    return read_tensors(like, meta)


def _copy_describing_files(like: Path, out: Path) -> list[Path]:
    """The files of ``like`` that describe the model and its inputs, copied
    to ``out``; from a GGUF file: its config as config.json and its
    tokenizer as tokenizer.json and tokenizer_config.json (with the chat
    template), which transformers and prism_ext both read."""
    if like.is_file():
        from ..inputs.tokenizer import gguf_tokenizer
        from . import gguf

        config = gguf.read_config(*gguf.header(like))
        tok = gguf_tokenizer(like)
        (out / "config.json").write_text(json.dumps(config, indent=1))
        tok.backend.save(str(out / "tokenizer.json"))
        tok_config = {**tok.special_tokens_map, "tokenizer_class": "PreTrainedTokenizerFast"}
        if tok.chat_template is not None:
            tok_config["chat_template"] = tok.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))
        return [out / "config.json", out / "tokenizer.json", out / "tokenizer_config.json"]
    written = []
    for name in sorted(_CHECKPOINT_FILES):
        if (like / name).is_file():
            written.append(Path(shutil.copyfile(like / name, out / name)))
    for name in sorted(_pipeline_dirs(like)):
        shutil.copytree(like / name, out / name, dirs_exist_ok=True, copy_function=shutil.copyfile)
        written += [f for f in (out / name).rglob("*") if f.is_file()]
    return written


def write_checkpoint(net: Network, like, out) -> Path:
    """Write ``net`` (e.g. fine-tuned) as a Hugging Face checkpoint in ``out``:
    the checkpoint directory ``like`` it was loaded from, every tensor of
    ``net`` in place of its own (same keys and dtypes, tensors ``net`` does not
    run kept as they were), as one model.safetensors; the files that describe
    the model and its inputs copied (config, tokenizer, processor,
    sentence-transformers modules; not the source's metrics or model card),
    every file with the mode this user's umask gives.
    Returns ``out``."""
    from safetensors.torch import save_file

    like, out = resolve(like), Path(out)
    if out.resolve() == like.resolve():
        raise ValueError(f"out: {out} is the checkpoint being rewritten; choose another directory")
    if net.weight_dtype != "fp32":
        raise ValueError(f"weight_dtype: this network is {net.weight_dtype}; write it with write_quantized")
    tensors, source = _source_tensors(like)
    found = Weights(tensors, source, (FAMILIES[net.model_type].BASE_PREFIX,))
    state = dict(tensors)
    for names, tensor in net.checkpoint_tensors():
        key = found.find(*names)
        if key is None:
            raise ValueError(f"weights: {source} has no tensor {names[0]!r} to write back")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(f"weights: {key!r} is {tuple(tensor.shape)} in the network, "
                             f"{tuple(state[key].shape)} in {source}")
        state[key] = tensor.detach().to(state[key].dtype).contiguous().clone()
    out.mkdir(parents=True, exist_ok=True)
    written = _copy_describing_files(like, out)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / _SAFE), metadata={"format": "pt"})
    for f in written + [out / _SAFE]:
        _as_created(f)
    return out
