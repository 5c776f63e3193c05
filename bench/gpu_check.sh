#!/usr/bin/env bash
# The first-GPU check: one unattended call (about 5-8 minutes on one H200) that prints the
# numbers the README needs and exits non-zero when any step fails.
#
#   bench/gpu_check.sh             # installs if needed (make install-test weights), then every step
#   bench/gpu_check.sh --no-cuda   # the same steps on the CPU, to check the script itself (slow, small)
#
# Steps: the test suite; the default model on the device against the CPU, decode tok/s in
# bfloat16 at batch 1 and 16 and prompts/min of the default workload (bench/gpu_check.py);
# a small sweep of each script, single process and (on CPU) 2 torchrun ranks, with wall times.
set -u -o pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
case "${1:-}" in
    "") ;;
    --no-cuda) DEVICE=cpu ;;
    *) echo "error: unknown argument '$1' (bench/gpu_check.sh takes only --no-cuda)" >&2; exit 2 ;;
esac
PY=.venv/bin/python
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nanokv-gpu-check.XXXXXX")
FAILED=()
SUMMARY=()

step() {  # step NAME COMMAND...: run, time, keep the last lines of its output, note a failure
    local name=$1; shift
    echo "=== $name: $*"
    local start=$SECONDS
    "$@" > "$WORK/$name.log" 2>&1
    local status=$?
    tail -n 25 "$WORK/$name.log"
    SUMMARY+=("$(printf '%-22s %-6s %5ss' "$name" "$([ $status = 0 ] && echo ok || echo FAILED)" $((SECONDS - start)))")
    [ $status = 0 ] || FAILED+=("$name (exit $status, log $WORK/$name.log)")
    return $status
}

if ! { [ -x $PY ] && $PY -c "import torch, transformers" 2>/dev/null && [ -f weights/smollm2-135m-instruct/model.safetensors ]; }; then
    step install make install-test weights || { echo "install failed: see $WORK/install.log" >&2; exit 1; }
fi
if [ $DEVICE = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
    $PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "error: this torch build sees no CUDA device: install torch's CUDA wheel into .venv, or run" \
                  "bench/gpu_check.sh --no-cuda to check the script on the CPU" >&2; rmdir "$WORK" 2>/dev/null; exit 1; }
fi

# The suite runs on the CPU (no test takes a device); on a 16-core machine it takes about a minute.
step pytest timeout 300 $PY -m pytest -q -x tests -p no:cacheprovider
step numbers timeout 300 $PY bench/gpu_check.py --device $DEVICE --json "$WORK/numbers.json" \
    $([ $DEVICE = cpu ] && echo --batch-sizes 1,4 --prompts 4 --new-tokens 8 --answer-tokens 8 --repeats 1)

# A small sweep on the default model: the issue's acceptance command, in bfloat16 on the GPU.
SWEEP=(--policy tova,snapkv --ratios 0,0.5 --limit 8 --device $DEVICE)
if [ $DEVICE = cuda ]; then SWEEP+=(--dtype bfloat16 --batch-size 16); else SWEEP+=(--max-new-tokens 8); fi
step sweep-evaluate timeout 300 $PY evaluate.py "${SWEEP[@]}" --out "$WORK/evaluate"
step sweep-leak timeout 300 $PY leak.py "${SWEEP[@]}" --out "$WORK/leak"
if [ $DEVICE = cpu ]; then   # one GPU cannot hold two nccl ranks; on CPU the 2 gloo ranks must match one process
    step torchrun-evaluate timeout 300 $PY -m torch.distributed.run --standalone --nproc-per-node 2 \
        evaluate.py "${SWEEP[@]}" --out "$WORK/evaluate-2"
    step same-summary cmp "$WORK/evaluate/summary.json" "$WORK/evaluate-2/summary.json"
fi

echo
echo "=================== nanokv GPU check ($DEVICE) ==================="
for line in "${SUMMARY[@]}"; do echo "$line"; done
grep -E "^[0-9]+ passed|passed|failed" "$WORK/pytest.log" | tail -n 1
if [ -f "$WORK/numbers.json" ]; then
    $PY - "$WORK/numbers.json" <<'EOF'
import json, sys
n = json.load(open(sys.argv[1]))
c = n["correctness"]
print(f"device {n['device']}, torch {n['torch']}")
print(f"float32 logits vs CPU, max |diff|: {c['float32_logits_max_abs_diff_vs_cpu']:.2e}; "
      f"bfloat16 France answer: {c['bfloat16_france_answer'][:60]!r}")
for batch, d in n["decode_bfloat16"].items():
    print(f"bfloat16 {batch}: prefill {d['prefill_tok_s']:,.0f} tok/s, decode {d['decode_tok_s']:,.1f} tok/s "
          f"({d['prompt_tokens']}-token prompt, {d['new_tokens']} new)")
for batch, d in n["batch_bfloat16"].items():
    print(f"bfloat16 {batch}: {d['prompts_per_minute']:,.1f} prompts/min ({d['jobs']} jobs, tova r=0.5, {d['answer_tokens']} new tokens)")
EOF
fi
echo "outputs: $WORK"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all steps passed"
