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
set -euo pipefail
part=${1:?usage: bash benchmarks/issue6_gpu.sh train|compile|infer|profile}
out_dir=${OUT:-outputs}
work=/tmp/issue6_$part
mkdir -p "$work" "$out_dir"
if [ -d .whl ] && ! python3 -c "import lpips, open_clip" 2>/dev/null; then
  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nets=/tmp/fullnets
[ -f "$nets/dinov2/config.json" ] || python3 scripts/make_tiny_networks.py --out "$nets" --full-size > "$work/make_nets.log" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$work/gpu.csv" 2>&1 || true
step="python3 -m evaluation.benchmark --preset large --biomedclip $nets/biomedclip --dino $nets/dinov2 --lpips-vgg random --no-inference --steps 15"
eff="python3 -m evaluation.efficiency --preset large --device cuda --dtypes bf16 --tasks tokenize reconstruct --settings 16x256 64x256 128x256 8x512"
pack() { tar -czf "$out_dir/issue6_$part.tar.gz" -C /tmp "issue6_$part"; }
# each measurement is packed as soon as it ends: a call cut off by the time limit still returns the finished ones
run() { local name=$1; shift; echo "== $name: $*"; "$@" > "$work/$name.log" 2>&1 || echo "   (exit $?: see $name.log)"
        tail -n 12 "$work/$name.log"; pack; }
case $part in
  train)
    run step_s1_eager $step --stage 1 --batch-sizes 16 32 48 --warmup 5 --out "$work/step_s1_eager"
    run step_s1_cl $step --stage 1 --batch-sizes 32 --channels-last --warmup 5 --out "$work/step_s1_cl"
    run step_s1_ckpt_vit $step --stage 1 --batch-sizes 64 --grad-ckpt --grad-ckpt-parts vit --warmup 5 --out "$work/step_s1_ckpt_vit"
    run step_s1_ckpt_conv $step --stage 1 --batch-sizes 64 --grad-ckpt --grad-ckpt-parts decoder_conv --warmup 5 --out "$work/step_s1_ckpt_conv"
    run step_s2_eager $step --stage 2 --batch-sizes 32 --warmup 5 --out "$work/step_s2_eager" ;;
  compile)
    run step_s1_compile $step --stage 1 --batch-sizes 32 --compile --warmup 10 --out "$work/step_s1_compile"
    run step_s2_compile $step --stage 2 --batch-sizes 32 --compile --warmup 10 --out "$work/step_s2_compile" ;;
  infer)
    run eff_eager $eff --out "$work/eff_eager"
    run eff_cl $eff --channels-last --out "$work/eff_cl"
    run eff_compile $eff --compile --warmup 6 --out "$work/eff_compile" ;;
  profile)
    run prof_tokenize python3 benchmarks/profile_kernels.py --workload tokenize --batch 64 --out "$work/prof_tokenize.json"
    run prof_tokenize_cl python3 benchmarks/profile_kernels.py --workload tokenize --batch 64 --channels-last --out "$work/prof_tokenize_cl.json"
    run prof_train python3 benchmarks/profile_kernels.py --workload train --batch 32 --out "$work/prof_train.json" ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
pack
echo "wrote $out_dir/issue6_$part.tar.gz"
