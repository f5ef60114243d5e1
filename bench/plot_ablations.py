"""bench/EVAL.md run 4: fidelity against bytes per sequence at P = 4, one
line per knob (its points are the CRs), from the JSON of bench/eval_runs.sh.
Usage: python bench/plot_ablations.py [results folder] -> ablations.png there."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODELS = {"minilm": ("minilm-pydoc", [4, 16, 64]), "gpt2": ("gpt2-lm", [4, 16, 32]), "vit": ("vit-digits", [4, 8, 16])}
KNOBS = ["hidden", "none", "fp16", "bf16", "int8", "ends", "grow"]


def line(result: dict, variant: str, crs) -> tuple[list, list, list]:
    pts = [p for p in result["points"] if p["status"] == "ok" and p["variant"] == variant and p["devices"] == 4
           and p["cr"] in crs]
    return [p["bytes"] / 1e3 for p in pts], [p["metrics"][result["fidelity"]] for p in pts], [p["cr"] for p in pts]


def main(folder: Path) -> Path:
    fig, axes = plt.subplots(1, len(MODELS), figsize=(16, 4.6))
    for ax, (model, (base, crs)) in zip(axes, MODELS.items()):
        runs = [(json.loads((folder / f"{base}.json").read_text()), "plain PRISM")]
        runs += [(json.loads(p.read_text()), None) for k in KNOBS if (p := folder / f"ablate-{model}-{k}.json").is_file()]
        for i, (r, variant) in enumerate(runs):
            variant = variant or r["points"][0]["variant"]
            x, y, c = line(r, variant, crs)
            ax.plot(x, y, marker="os^Dvx<>"[i % 8], ls="-" if i == 0 else "--", color=f"C{i}", label=variant)
            if i == 0:
                for xi, yi, ci in zip(x, y, c):
                    ax.annotate(f"CR {ci}", (xi, yi), fontsize=7, textcoords="offset points", xytext=(3, -9))
        ax.set_xscale("log")
        ax.set_xlabel("KB sent per sequence (P = 4, all layers)")
        ax.set_ylabel(f"{runs[0][0]['fidelity']} to the exact model")
        ax.set_title(f"{model} ({runs[0][0]['task']})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = folder / "ablations.png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/eval")))
