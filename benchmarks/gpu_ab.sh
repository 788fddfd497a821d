#!/usr/bin/env bash
# One GPU A/B run of every speed variant against the baseline, in ONE call of at most 8 minutes on a bare
# H100/H200 (torch, timm, transformers installed; other wheels from .whl/, see docs/performance.md):
#
#   bash benchmarks/gpu_ab.sh            # writes $OUT/gpu_ab.json (+ gpu_ab_runs.tar.gz) and prints the table last
#
# What it times, most important first (a command that would run past the budget is skipped and listed):
#   1. tokenize / reconstruct, bf16, batch 16/64/128 at 256 px (python -m evaluation.efficiency --variants):
#      baseline, channels-last, direct upsampling (± channels-last), fused LayerNorm2d+GELU (Triton),
#      chunked quantizer scoring, CUDA graphs (± channels-last + fused norm) — one process, same weights and
#      inputs, ids agreement % and max |Δ| of reconstructions against the baseline;
#   2. the full training step, every loss, stage 1 (python -m tokenizer_training.benchmark, via benchmarks/ab_train.py):
#      baseline at 32, checkpointing vit_selective+decoder_conv at 64, baseline at 64 (does not fit 80 GB),
#      checkpointing vit and vit_selective at 64,
#      direct upsampling at 32, stage 2 at 32 — loss gaps against the baseline at the same batch;
#   3. regional torch.compile (inductor): tokenize/reconstruct at 64 and the training step at 32, warm-up
#      (compilation) timed apart; each compiled process's exit lag is reported (the old hang at exit).
# Each command runs under `timeout`, its output goes to $GPU_AB_WORK/gpu_ab/<name>/, and the whole folder is
# packed into $OUT/gpu_ab_runs.tar.gz at the end. The loss networks are BiomedCLIP/DINOv2/VGG16
# architectures with random weights (speed does not depend on weight values).
#
# GPU_AB_SMOKE=1: the same commands on the CPU (tiny preset and networks, 32 px, batch 2, one timed step,
# aot_eager instead of inductor): checks the plumbing (tests/test_benchmark.py), not the speed.
# GPU_AB_BUDGET_S: seconds for all measurements (default 440; the report and packing take a few more).
set -uo pipefail
start=$(date +%s)
budget=${GPU_AB_BUDGET_S:-440}
[ "${GPU_AB_SMOKE:-0}" = 1 ] && budget=${GPU_AB_BUDGET_S:-100000}  # a loaded CPU may take long: never skip
out_dir=${OUT:-outputs}
work=${GPU_AB_WORK:-/tmp}/gpu_ab
rm -rf "$work"; mkdir -p "$work" "$out_dir"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -d .whl ] && ! $PY -c "import lpips, open_clip" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
if [ "${GPU_AB_SMOKE:-0}" = 1 ]; then
  preset=tiny; dev=cpu; px=32; steps=1; warm=1; nets_flag=; b32=2; b64=3; caps=20
  settings="2x32"; regional_settings="2x32"; backend="--compile-backend aot_eager"; iters="--warmup 1 --iters 1"
  eff_variants="baseline upsample_direct cuda_graphs"
  regional_variants="baseline regional_compile"
else
  preset=large; dev=cuda; px=256; steps=5; warm=3; nets_flag=--full-size; b32=32; b64=64; caps=1
  settings="16x256 64x256 128x256"; regional_settings="64x256"; backend=; iters="--warmup 3 --iters 5"
  eff_variants="baseline channels_last upsample_direct channels_last_direct fused_norm score_chunk cuda_graphs cuda_graphs_cl_fused"
  regional_variants="baseline regional_compile regional_compile_cl"
fi
nets=${GPU_AB_WORK:-/tmp}/gpu_ab_nets_$preset
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$work/gpu.csv" 2>&1 || true

# run NAME CAP_S CMD...: run CMD under `timeout` if the budget allows, log to $work/NAME/log.txt
run() {
  local name=$1 cap=$2; shift 2
  cap=$(( cap * caps ))
  local left=$(( budget - ($(date +%s) - start) ))
  if [ "$left" -lt 25 ]; then echo "== $name: skipped (budget)"; echo "$name" >> "$work/skipped.txt"; return; fi
  local t=$(( cap < left ? cap : left ))
  mkdir -p "$work/$name"
  echo "== $name (limit ${t}s): $*"
  local s=$(date +%s.%N)
  timeout -k 10 "$t" "$@" > "$work/$name/log.txt" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$s" "$(date +%s.%N)" >> "$work/runs.tsv"
  [ $rc = 0 ] || { echo "   exit $rc:"; tail -n 5 "$work/$name/log.txt"; }
}

# the loss networks are written on the CPU while the GPU runs the inference variants
nets_pid=
if [ ! -f "$nets/dinov2/config.json" ]; then
  ( $PY scripts/make_tiny_networks.py --out "$nets" $nets_flag > "$work/make_nets.log" 2>&1 ) & nets_pid=$!
fi
eff="$PY -m evaluation.efficiency --preset $preset --device $dev --dtypes bf16 --tasks tokenize reconstruct $iters"
run eff_variants 150 $eff --settings $settings --variants $eff_variants --out "$work/eff_variants"

[ -n "$nets_pid" ] && { wait "$nets_pid" || echo "   make_tiny_networks failed: see $work/make_nets.log"; }
step="--preset $preset --device $dev --img-size $px --biomedclip $nets/biomedclip --dino $nets/dinov2 --lpips-vgg random --no-inference --steps $steps --warmup $warm"
# one trainer per variant (same seed, weights and batch): losses after the same steps are comparable
train_variants=(--variant baseline "--stage 1 --batch-sizes $b32"
  --variant ckpt_vit_selective_conv "--stage 1 --batch-sizes $b64 --grad-ckpt --grad-ckpt-parts vit_selective+decoder_conv")
[ "${GPU_AB_SMOKE:-0}" = 1 ] || train_variants+=(
  --variant baseline_b64 "--stage 1 --batch-sizes $b64"
  --variant ckpt_vit "--stage 1 --batch-sizes $b64 --grad-ckpt --grad-ckpt-parts vit"
  --variant upsample_direct "--stage 1 --batch-sizes $b32 --upsample direct"
  --variant ckpt_vit_selective "--stage 1 --batch-sizes $b64 --grad-ckpt --grad-ckpt-parts vit_selective")
run train 220 $PY benchmarks/ab_train.py --out "$work/train" --common "$step" "${train_variants[@]}"
run eff_regional 120 $eff --settings $regional_settings --variants $regional_variants $backend --out "$work/eff_regional"
if [ "${GPU_AB_SMOKE:-0}" != 1 ]; then  # CPU smoke: the two commands below are ab_train.py again, not run
run train_regional 110 $PY benchmarks/ab_train.py --out "$work/train" --common "$step $backend" \
  --variant regional_compile "--stage 1 --batch-sizes $b32 --warmup $((warm + 2)) --compile-form regional"
run train_s2 60 $PY benchmarks/ab_train.py --out "$work/train" --common "$step" \
  --variant baseline_s2 "--stage 2 --batch-sizes $b32"
fi

tar -czf "$out_dir/gpu_ab_runs.tar.gz" -C "$(dirname "$work")" "$(basename "$work")"
$PY benchmarks/gpu_ab_report.py "$work" "$out_dir/gpu_ab.json"
