#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check`): on a machine with an NVIDIA GPU and no network, it
#   1. installs the TensorRT wheels carried in WHEELS (if given) with pip --no-index,
#   2. runs the gpu-marked tests,
#   3. builds and validates fp16, int8 and fp8 TensorRT engines for BGE-VL-base's architecture (ViT-B/16
#      towers, random weights generated offline: --model base --random-weights),
#   4. runs bgevl-bench with the ONNX Runtime CUDA / TensorRT providers and the TensorRT engines,
# writing everything (logs, manifests, engine sidecars, bench reports, a summary) to one results folder.
# A step that fails is recorded and the next one runs; the exit status is that of the worst step.
#
#   make gpu-check                                      # .venv's python, results in gpu-results/<UTC time>
#   WHEELS=/mnt/wheels RESULTS=out/gpu make gpu-check   # wheels carried in: tensorrt, tensorrt-cu*-libs,
#                                                       # tensorrt-cu*-bindings, cuda-python, onnxruntime-gpu
#
# Variables: PYTHON (default .venv/bin/python), WHEELS (a folder of wheels), RESULTS (the results folder),
# BATCH_SIZES (bench, default 1,8,32), MODEL (default base).
set -uo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-base}
BATCH_SIZES=${BATCH_SIZES:-1,8,32}
RESULTS=${RESULTS:-gpu-results/$(date -u +%Y%m%dT%H%M%SZ)}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "gpu-check: needs an NVIDIA GPU with its driver (nvidia-smi lists none here); run it on a GPU machine, with WHEELS=DIR holding the tensorrt, cuda-python and onnxruntime-gpu wheels if it has no network" >&2
    exit 2
fi
if [ ! -x "$PYTHON" ]; then
    echo "gpu-check: no Python at $PYTHON; run \`make env\` first (or set PYTHON=...)" >&2
    exit 2
fi

mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"
worst=0

step() {  # step NAME COMMAND...: run, log to RESULTS/NAME.log, record the status
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    printf '%-28s exit %3d  %5ds  %s\n' "$name" "$rc" "$((SECONDS - start))" "$*" | tee -a "$SUMMARY"
    [ "$rc" -gt "$worst" ] && worst=$rc
    return 0
}

if [ -n "${WHEELS:-}" ]; then
    step install "$PYTHON" -m pip install --no-index --find-links "$WHEELS" \
        "tensorrt>=10.12,<12" "cuda-python>=12" "onnxruntime-gpu>=1.20"
fi

{
    nvidia-smi
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
    "$PYTHON" - <<'EOF'
import importlib.metadata as md
for dist in ("bgevl-export", "tensorrt", "tensorrt-cu12", "tensorrt-cu13", "cuda-python", "onnxruntime", "onnxruntime-gpu",
             "onnx", "torch", "numpy"):
    try:
        print(f"{dist}=={md.version(dist)}")
    except md.PackageNotFoundError:
        pass
from bgevl.runtime.tensorrt import tensorrt_status
print("tensorrt_status:", tensorrt_status())
EOF
} > "$RESULTS/environment.txt" 2>&1

step gpu-tests "$PYTHON" -m pytest -m gpu -q -rs --junitxml="$RESULTS/gpu-tests.xml"

EXPORTS="$RESULTS/exports"
mkdir -p "$EXPORTS"
# the directory names bgevl-bench looks for (<model>-random-<precision>[-<int8 mode>]), so it reuses these
for precision in fp16 int8 fp8; do
    out="$EXPORTS/$MODEL-random-$precision"
    [ "$precision" = int8 ] && out="$out-qdq"
    export_cmd=("$PYTHON" -m bgevl.export.cli --model "$MODEL" --random-weights --precision "$precision" --format tensorrt
                --output "$out" --overwrite)
    if [ "$precision" = fp8 ] && ! awk -v cc="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)" \
            'BEGIN { exit !(cc + 0 >= 8.9) }'; then
        # no FP8 on this GPU: the check is that the build refuses it in one line
        step engines-fp8-refused bash -c '"$@" 2>&1 | tee /dev/stderr | grep -q "^bgevl-export: error: fp8 engines need a GPU of compute capability 8.9"' _ "${export_cmd[@]}"
        continue
    fi
    step "engines-$precision" "${export_cmd[@]}"
    for f in "$out/manifest.json" "$out"/tensorrt/*.plan.json; do
        [ -f "$f" ] && cp "$f" "$RESULTS/$precision-$(basename "$f")"
    done
done

step bench "$PYTHON" -m bgevl.benchmarks.cli --models "$MODEL" --random-weights \
    --backends onnxruntime-cuda-fp16,onnxruntime-tensorrt-fp16,tensorrt-fp16,tensorrt-int8,tensorrt-fp8 \
    --batch-sizes "$BATCH_SIZES" --exports "$EXPORTS" --output "$RESULTS/bench"

rm -f "$EXPORTS"/*/*.onnx "$EXPORTS"/*/*.onnx.data "$EXPORTS"/*/tensorrt/*.plan  # keep the records, not GBs of graphs
echo "gpu-check: results in $RESULTS (summary.txt); worst exit status $worst"
exit "$worst"
