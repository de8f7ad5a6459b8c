#!/usr/bin/env bash
# The GPU checks of the cloud verifier, in one go (a lent GPU machine's time is short): the CUDA tests, what one
# cloud forward costs on the GPU and on this machine's CPU (the built-in cloud, and LlamaGen-sized ones in bf16),
# `ciar bench methods` with the cloud on the GPU and the device side on one CPU thread (the shipped int8 ONNX
# bundle), and the bridge under load with its cloud on the GPU. About 6 minutes on an H200 (docs/BENCHMARKS.md 3c).
#
#     bash bench/gpu_cloud.sh OUTDIR [PROMPTS]      (PROMPTS: held-out prompts of the method benchmark, default 40;
#                                                    about 3.2 s each on an H200 host, plus the quality pass)
#
# Writes OUTDIR/log and one JSON per benchmark (7 files). CLOUD_DEVICE (default cuda) and PYTHON (default python3)
# override. A step that fails or outlives its limit is logged and the next one runs.
set -u
out=${1:?usage: bash bench/gpu_cloud.sh OUTDIR [PROMPTS]}
prompts=${2:-40}
dev=${CLOUD_DEVICE:-cuda}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
log="$out/log"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* ($(date -u +%T))" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v '^ *$' | tee -a "$log" | tail -n 40
    echo "== $name rc=${PIPESTATUS[0]} ($(date -u +%T))" | tee -a "$log"
}

{ date -u; nvidia-smi -L 2>&1; lscpu 2>/dev/null | grep -E '^(Model name|CPU\(s\))'; } | tee -a "$log"
step versions 60 "$py" -c "import torch, onnxruntime, numpy; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available() and torch.cuda.get_device_name(0), 'onnxruntime', onnxruntime.__version__, 'numpy',
numpy.__version__)"
step tests 150 "$py" -m pytest -q -p no:cacheprovider tests/test_cloud_device.py -k "not refused"
step cloud_forward_gpu 60 "$py" bench/cloud_forward.py --device "$dev" --json "$out/cloud_forward_gpu.json"
step cloud_forward_cpu 90 "$py" bench/cloud_forward.py --device cpu --repeats 3 --json "$out/cloud_forward_cpu.json"
[[ $dev == cuda* ]] && shapes="GPT-XL GPT-7B" || shapes=""  # LlamaGen-sized clouds: on a GPU only
for shape in $shapes; do
    step "cloud_forward_$shape" 90 "$py" bench/cloud_forward.py --device "$dev" --shape "$shape" --dtype bf16 \
        --tokens 1,2,4,8 --repeats 3 --json "$out/cloud_forward_gpu_$shape.json"
done
step methods $((60 + 6 * prompts)) "$py" -m ciar.cli.main bench methods --prompts "$prompts" --link all --budget \
    --methods cloud ciar ciar-inflight --device-bundle runtime/bundles/onnx-int8 --cloud-device "$dev" \
    --json "$out/methods_gpu.json"
step bridge_load 90 "$py" bench/bridge_load.py --device "$dev" --sessions 1 8 --json "$out/bridge_load_gpu.json"
