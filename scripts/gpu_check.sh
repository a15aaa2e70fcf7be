#!/usr/bin/env bash
# GPU check (issue #19), for when a GPU machine is lent: each step has a time limit, 6 minutes in all on one GPU
# (8 with the NCCL runs); expected well under that on an H100/H200.
#
#   scripts/gpu_check.sh [OUT_DIR]        (OUT_DIR: the first argument, else $OUT, else runs/gpu_check)
#
# 1. the environment (GPU, driver, torch, CUDA) -> OUT_DIR/env.txt
# 2. the tests that touch CUDA paths (tests/test_data_loading.py whole, and every test named *cuda*)
# 3. scripts/bench_tpt.py for the ViT-B/16-sized model on the GPU (kornia views on the device vs the reference
#    recipe, C = 10, 200, 1000)                                             -> OUT_DIR/tpt_vitb16.json
# 4. scripts/bench_data.py on the GPU (nvJPEG decoding, pinned copies, workers; 5,000 400x300 JPEGs)
#                                                                          -> OUT_DIR/data_throughput.json
# 5. with more than one GPU: a short torchrun run over NCCL (Finetune on the world, 5 tasks), and the same run in
#    one process; their accuracy matrices must agree                      -> OUT_DIR/torchrun_results.json
# A summary of every step (status, seconds) -> OUT_DIR/gpu_check.json; logs -> OUT_DIR/*.log.
#
# Installs nothing by itself: the lent machines cannot reach a package index. A Python module that is missing is
# named, and installed only from a folder of wheels given as WHEELS=DIR (pip --no-index). PYTHON picks the
# interpreter (default python3). Without a CUDA device it stops at once with exit code 2.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-$root/runs/gpu_check}}"
py="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
t0=$(date +%s)
summary="$out/steps.tsv"
: >"$summary"

say() { printf '[gpu_check %4ss] %s\n' "$(($(date +%s) - t0))" "$*"; }

# step NAME TIMEOUT_S COMMAND...: run it with a time limit, log to OUT_DIR/NAME.log, record status and seconds
step() {
    local name=$1 limit=$2 s rc=0
    shift 2
    s=$(date +%s)
    say "$name: $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1 || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - s))" >>"$summary"
    if [ "$rc" -eq 0 ]; then say "$name: ok"; else say "$name: FAILED (exit $rc; tail of $out/$name.log below)"; tail -n 20 "$out/$name.log"; fi
}

# ------------------------------------------------------------------------------------------ CUDA and modules
if ! command -v "$py" >/dev/null 2>&1; then
    echo "gpu_check: no Python interpreter '$py' (set PYTHON=...)" >&2
    exit 2
fi
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device: $py's torch cannot see a GPU (torch.cuda.is_available() is False, or torch" \
        "is missing). Run this on a GPU machine." >&2
    exit 2
fi
read -r -a missing <<<"$("$py" - <<'EOF'
import importlib.util
need = {"torchvision": "torchvision", "open_clip": "open_clip_torch", "kornia": "kornia", "hydra": "hydra-core",
        "safetensors": "safetensors", "PIL": "pillow", "tqdm": "tqdm", "matplotlib": "matplotlib", "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)"
if [ "${#missing[@]}" -gt 0 ]; then
    if [ -z "${WHEELS:-}" ]; then
        echo "gpu_check: missing Python packages: ${missing[*]}. Give a folder of their wheels as WHEELS=DIR" \
            "(pip install --no-index), or use an interpreter that has them (PYTHON=...)." >&2
        exit 3
    fi
    say "installing ${missing[*]} from $WHEELS"
    "$py" -m pip install --no-index --find-links "$WHEELS" "${missing[@]}"
fi
ngpu=$("$py" -c 'import torch; print(torch.cuda.device_count())')
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: unavailable"
    "$py" -c 'import torch, torchvision, sys; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "torchvision", torchvision.__version__, "gpus", torch.cuda.device_count(),
torch.cuda.get_device_name(0))'
    nproc
} >"$out/env.txt"
say "$(tail -n 2 "$out/env.txt" | head -n 1)"

# ------------------------------------------------------------------------------------------ the checks
step tests 60 "$py" -m pytest -q -p no:cacheprovider tests/test_data_loading.py
step tests_cuda 60 "$py" -m pytest -q -p no:cacheprovider tests -k cuda
step tpt_vitb16 120 "$py" scripts/bench_tpt.py --models vitb16 --classes 10 200 1000 --device cuda \
    --vitb-samples 3 --vitb-ref-samples 2 --out "$out/tpt_vitb16.json"
step data 150 "$py" scripts/bench_data.py --device cuda --threads 4 --repeats 1 --loading-images 1000 \
    --cache "${TMPDIR:-/tmp}/ctta_bench_data" --out "$out/data_throughput.json"
if [ "$ngpu" -gt 1 ]; then
    args=(strategy=finetune stream=world_cil5 stream.train_per_class=20 stream.test_per_class=10 strategy.epochs=1
          hooks=minimal progress=false device=cuda)
    step torchrun_nccl 50 "$py" -m torch.distributed.run --standalone --nproc_per_node="$ngpu" scripts/run.py \
        "${args[@]}" "out_dir=$out/torchrun_nccl"
    step one_process 50 "$py" scripts/run.py "${args[@]}" "out_dir=$out/one_process"
else
    say "one GPU: no NCCL run"
fi

# ------------------------------------------------------------------------------------------ summary
"$py" - "$out" "$ngpu" <<'EOF'
import json, os, sys, tempfile
from pathlib import Path
out, ngpu = Path(sys.argv[1]), int(sys.argv[2])
steps = [dict(zip(("step", "exit", "seconds"), line.split("\t"))) for line in (out / "steps.tsv").read_text().splitlines()]
doc = {"gpus": ngpu, "env": (out / "env.txt").read_text(), "steps": steps,
       "ok": all(s["exit"] == "0" for s in steps)}
runs = [out / k / "results.json" for k in ("torchrun_nccl", "one_process")]
if all(p.exists() for p in runs):
    a, b = (json.loads(p.read_text())["results"]["accuracy_matrix"] for p in runs)
    doc["torchrun_matrix_equals_one_process"] = a == b
    (out / "torchrun_results.json").write_text(json.dumps({"nccl": a, "one_process": b}, indent=1))
fd, tmp = tempfile.mkstemp(dir=out)
with os.fdopen(fd, "w") as f:
    json.dump(doc, f, indent=1)
os.replace(tmp, out / "gpu_check.json")
print(json.dumps({s["step"]: (s["exit"], s["seconds"] + " s") for s in steps}), "ok" if doc["ok"] else "FAILED")
EOF
say "done: $out/gpu_check.json"
