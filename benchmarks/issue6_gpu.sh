#!/usr/bin/env bash
# Issue-6 measurements on one GPU, in as few device calls as possible (each part fits the 10-minute limit of
# one call). Results go to $OUT/issue6_<part>.tar.gz (one file: the device tool returns at most 8).
#
#   bash benchmarks/issue6_gpu.sh train     # full step, stage 1 at batch 16/32/48 (+ channels-last) and stage 2
#   bash benchmarks/issue6_gpu.sh compile   # full step with torch.compile (longer warm-up)
#   bash benchmarks/issue6_gpu.sh infer     # tokenize / reconstruct grid: eager, channels-last, compiled
#   bash benchmarks/issue6_gpu.sh profile   # torch.profiler breakdowns (tokenize b64, tokenizer train step b32)
#
# On a machine without lpips/open_clip, put their wheels in .whl/ (docs/performance.md, "Measuring on a GPU").
# The loss networks are BiomedCLIP / DINOv2 / VGG16 architectures with random weights (speed does not depend
# on the values): the real weights cannot be downloaded on the benchmark machine.
#
# ISSUE6_SMOKE=1 runs every command of a part on the CPU with the tiny preset, tiny networks, batch 2 at 32 px
# and one timed step: it checks the plumbing (tests/test_benchmark.py), not the speed.
set -euo pipefail
part=${1:?usage: bash benchmarks/issue6_gpu.sh train|compile|infer|profile}
out_dir=${OUT:-outputs}
work=${ISSUE6_WORK:-/tmp}/issue6_$part
mkdir -p "$work" "$out_dir"
if [ -d .whl ] && ! python3 -c "import lpips, open_clip" 2>/dev/null; then
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
if [ "${ISSUE6_SMOKE:-0}" = 1 ]; then
  preset=tiny; dev=cpu; px=32; steps=1; warm=1; nets_flag=; b16=2; b32=2; b48=2; b64=2
  settings="2x32"; compile_flags="--compile-backend aot_eager"; iters="--warmup 1 --iters 1"
else
  preset=large; dev=cuda; px=256; steps=15; warm=5; nets_flag=--full-size; b16=16; b32=32; b48=48; b64=64
  settings="16x256 64x256 128x256 8x512"; compile_flags=; iters=
fi
nets=$work/../issue6_nets_$preset
# the loss networks are needed only by the training-step parts
case $part in train|compile) [ -f "$nets/dinov2/config.json" ] || python3 scripts/make_tiny_networks.py --out "$nets" $nets_flag > "$work/make_nets.log" 2>&1 ;; esac
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$work/gpu.csv" 2>&1 || true
step="python3 -m evaluation.benchmark --preset $preset --device $dev --img-size $px --biomedclip $nets/biomedclip --dino $nets/dinov2 --lpips-vgg random --no-inference --steps $steps"
eff="python3 -m evaluation.efficiency --preset $preset --device $dev --dtypes bf16 --tasks tokenize reconstruct --settings $settings $iters"
prof="python3 benchmarks/profile_kernels.py --preset $preset --device $dev --img-size $px $iters"
pack() { tar -czf "$out_dir/issue6_$part.tar.gz" -C "$(dirname "$work")" "issue6_$part"; }
# each measurement is packed as soon as it ends: a call cut off by the time limit still returns the finished ones
failed=0
run() { local name=$1; shift; echo "== $name: $*"; "$@" > "$work/$name.log" 2>&1 || { echo "   (exit $?: see $name.log)"; failed=1; }
        tail -n 12 "$work/$name.log"; pack; }
case $part in
  train)
    run step_s1_eager $step --stage 1 --batch-sizes $b16 $b32 $b48 --warmup $warm --out "$work/step_s1_eager"
    run step_s1_cl $step --stage 1 --batch-sizes $b32 --channels-last --warmup $warm --out "$work/step_s1_cl"
    run step_s1_ckpt_vit $step --stage 1 --batch-sizes $b64 --grad-ckpt --grad-ckpt-parts vit --warmup $warm --out "$work/step_s1_ckpt_vit"
    run step_s1_ckpt_conv $step --stage 1 --batch-sizes $b64 --grad-ckpt --grad-ckpt-parts decoder_conv --warmup $warm --out "$work/step_s1_ckpt_conv"
    run step_s2_eager $step --stage 2 --batch-sizes $b32 --warmup $warm --out "$work/step_s2_eager" ;;
  compile)
    run step_s1_compile $step --stage 1 --batch-sizes $b32 --compile $compile_flags --warmup $((warm * 2)) --out "$work/step_s1_compile"
    run step_s2_compile $step --stage 2 --batch-sizes $b32 --compile $compile_flags --warmup $((warm * 2)) --out "$work/step_s2_compile" ;;
  infer)
    run eff_eager $eff --out "$work/eff_eager"
    run eff_cl $eff --channels-last --out "$work/eff_cl"
    run eff_compile $eff --compile $compile_flags --warmup 6 --out "$work/eff_compile" ;;
  profile)
    run prof_tokenize $prof --workload tokenize --batch $b64 --out "$work/prof_tokenize.json"
    run prof_tokenize_cl $prof --workload tokenize --batch $b64 --channels-last --out "$work/prof_tokenize_cl.json"
    run prof_train $prof --workload train --batch $b32 --out "$work/prof_train.json" ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
pack
echo "wrote $out_dir/issue6_$part.tar.gz"
exit $failed
