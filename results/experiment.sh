#!/usr/bin/env bash
# Memory-R2's three claims at the code's defaults: five arms x SEEDS seeds, one SFT model per seed shared
# by that seed's arms (paired intervals over seeds, the SFT's own spread included). One queue, SFT models
# first, on two --threads 1 workers; resumable: rerun the same command after an interruption (a finished
# run is skipped, a started one resumes). Last, each finished run's args.json, metrics.jsonl and
# result.json go to results/runs/<arm>-s<seed>/ (the SFT runs' to results/sft/), and eval.py compare
# regenerates results/table.md, runs.json and the figures from them. Checkpoints stay in OUT.
#   bash results/experiment.sh [SEEDS, default 8] [OUT, default runs/exp]
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-8} out=${2:-runs/exp}
run() {  # NAME FLAGS...: a finished run is skipped, a started one resumed, else started
  local d=$OUT/$1; shift
  [ -f "$d/result.json" ] && return 0
  case $(basename "$d") in
    sft-*) [ -f "$d/sft/model.safetensors" ] && return 0;;  # SFT-only runs write no result
    *) local sft=$OUT/sft-s${d##*-s}/sft/model.safetensors  # an arm waits for its seed's SFT model (the other worker's)
       while [ ! -f "$sft" ]; do pgrep -f "sft-s${d##*-s} " > /dev/null || return 1; sleep 20; done;;
  esac
  if [ -f "$d/last/meta.json" ] || [ -f "$d/sft/model.safetensors" ]; then python train.py --resume "$d" --threads 1
  else rm -rf "$d"; python train.py --out "$OUT" --threads 1 --name "$(basename "$d")" "$@"; fi
}
export -f run; export OUT=$out
mkdir -p "$out"
# 1. the SFT models (SFT only: --steps-per-stage 0 passes the warm start through, no test read), then
# 2. the arms, each from its seed's SFT model. Matched budgets, measured on the default run
#    (results/default): LoGo's curriculum makes 318 optimizer steps and 370,882 generated tokens;
#    GRPO's pool is ~0.67 of LoGo's (local rows 31-36 %), so 43-cell mini-batches match its steps;
#    a direct 32-session step generates ~29,600 tokens, so 13 steps match its tokens.
{ for s in $(seq 0 $((seeds - 1))); do echo "sft-s$s --seed $s --stages 8 --steps-per-stage 0 --no-final-eval"; done
  for s in $(seq 0 $((seeds - 1))); do
    init="--init $out/sft-s$s/sft --seed $s"
    echo "a-logo-8-16-32-s$s $init"                                     # (a) LoGo 8->16->32, the default
    echo "b-grpo-mb43-s$s $init --algo grpo --minibatch 43"             # (b) GRPO, matched optimizer steps
    echo "c-logo-32-s$s $init --stages 32 --steps-per-stage 13"         # (c) LoGo direct 32, matched tokens
    echo "d-logo-separate-s$s $init --separate-roles"                   # (d) separate extractor/manager weights
    echo "e-logo-greedy-s$s $init --local-decoding greedy"              # (e) greedy local re-rolls (official)
  done; } | xargs -P 2 -L 1 bash -c 'run "$@" > "$OUT/$1.log" 2>&1 || echo "failed: $1 (see $OUT/$1.log)"' _
# 3. the committed record: (a) sorts first, so compare measures every arm against it
for d in "$out"/sft-s* "$out"/[a-e]-*-s*; do
  [ -d "$d" ] || continue
  case $(basename "$d") in
    sft-*) [ -f "$d/sft/model.safetensors" ] || continue; to=results/sft/$(basename "$d");;
    *) [ -f "$d/result.json" ] || continue; to=results/runs/$(basename "$d");;
  esac
  mkdir -p "$to" && cp "$d"/args.json "$d"/metrics.jsonl "$to"/ && { [ ! -f "$d/result.json" ] || cp "$d/result.json" "$to"/; }
done
python eval.py compare results/runs/* --out results
