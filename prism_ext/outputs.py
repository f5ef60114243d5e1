"""Results as plain dicts (JSON-ready), shared by every application of the
model face (``prism run``, ``prism serve``)."""

from __future__ import annotations

import torch

from .method.engine import RunStats


def stats_dict(stats: RunStats) -> dict:
    """A run's costs, per device and in total (JSON-ready)."""
    return {
        "mode": stats.mode, "crs": list(stats.crs), "wire_dtype": stats.wire_dtype,
        "partition": [list(r) for r in stats.partition.ranges],
        "bytes_sent": stats.bytes_sent, "activation_bytes": stats.activation_bytes,
        "flops": sum(d.flops for d in stats.devices),
        "devices": [{"rank": d.rank, "positions": [d.start, d.stop], "bytes_sent": d.bytes_sent,
                     "activation_bytes": d.activation_bytes, "flops": d.flops, "seconds": d.seconds,
                     "weight_bytes": d.weight_bytes, "peak_rss": d.peak_rss, "kv_cache_bytes": d.kv_cache_bytes}
                    for d in stats.devices],
    }


def class_output(config: dict, logits: torch.Tensor) -> dict:
    """One row of classifier logits as a result: the top class, its label
    (the checkpoint ``config``'s ``id2label``) and probability."""
    labels = config.get("id2label") or {}
    probs = torch.softmax(logits, -1)
    k = int(probs.argmax())
    return {"class_id": k, "label": labels.get(str(k), str(k)), "probability": float(probs[k]),
            "logits": logits.tolist()}
