#!/usr/bin/env bash
# DeepSpeed through accelerate on one GPU (issue 14): does `fastdpo train` run under
# `accelerate launch --config_file examples/accelerate/zero3.yaml` (and zero2.yaml), with the fused LM head reading
# a ZeRO-3-partitioned head, and does it train like a plain single-GPU run? About 3 minutes on an H200.
#
# Runs, all from one cache, --max-steps 3 --batch-size 2 --grad-accum 2 --lr 1e-4 (accumulation exercised):
#   plain        python3 -m fastdpo train ...                        the reference: one GPU, no DeepSpeed
#   plain-eager  the same, --logps-backend eager                     full logits through lm_head: the noise floor
#   zero3        accelerate launch --config_file examples/accelerate/zero3.yaml --num_processes 1 -m fastdpo train
#   zero3-eager  the same, --logps-backend eager                     ZeRO-3's ordinary path (lm_head's own forward)
#   zero2        accelerate launch --config_file examples/accelerate/zero2.yaml --num_processes 1 ...
#   zero3-resume (--with-resume) 4 steps with a checkpoint at 2, then a second run resumed from it
# Checks, each against plain (the eager runs against plain-eager):
#   - DeepSpeed engaged: the run logs "DeepSpeed ZeRO-N" (fastdpo without DeepSpeed support fails in `prepare` on a
#     GPU, or runs as a plain process on a CPU);
#   - every step's loss within TOL (bf16-mixed: 2e-2, the sharded stage's; fp32: 1e-4), the step-1 gradient norm
#     within 5 % (identical weights: only reduction order and bf16 rounding differ);
#   - the LM head trained: ||W_run - W_plain|| / ||W_plain - W_init|| of the head's weight in the saved models
#     (`head_dev`) at most max(0.5, 2 x plain-eager's): a head whose gradient was lost stays at W_init (1.0);
#   - the final model.safetensors holds every tensor of plain's, same shapes (ZeRO-3 gathered it);
#   - zero3-resume: the resumed steps' losses equal the uninterrupted run's within TOL.
#
# On a CUDA machine with network: pip install -e . && DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed.
# Without network, build and download the wheels elsewhere (PyPI ships deepspeed only as a source package; its
# wheel is py3-none-any) and bring the folder with the code; in the repository's root:
#   python3 -m venv /tmp/whlenv && /tmp/whlenv/bin/pip install -q torch==2.13.0 setuptools wheel
#   DS_BUILD_OPS=0 /tmp/whlenv/bin/pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w wheels
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels \
#       hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#       datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# (about 6 MB; with gpu_check.sh's wheels in the same folder, keep one version of each), then on the machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site
#   bash benchmarks/gpu_check_zero3.sh --out gpu_check_zero3_out
# Outputs in $OUT (--out DIR elsewhere): gpu_check_zero3.md (verdict, table, the end of each failed run's log) and
# gpu_check_zero3.csv.
#
# --cpu: the same on a CPU with a tiny model in float32 (DeepSpeed runs on CPU over gloo, once fastdpo passes
# cpu=False under DeepSpeed), ZeRO-3 from a DeepSpeed json that partitions every parameter (the tiny head is under
# DeepSpeed's default persistence threshold of 1e5 elements, which would keep it whole); about 2 minutes on 2 cores:
#   bash benchmarks/gpu_check_zero3.sh --cpu --out /tmp/z3
# Options: --cpu, --model DIR and --cache DIR (default: built here: bench_train's qwen2.5-0.5b preset, or tiny with
# --cpu, and a cache of the bundled demo pairs), --out DIR, --with-resume, --keep-work. Environment: PYTHON
# (default python3). Exit status: 0 when every run passed or the check was skipped (no deepspeed, no GPU).

set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/.." && pwd)"
cd "$REPO" || exit 1
PY="${PYTHON:-python3}"

CPU=0 MODEL="" CACHE="" OUTDIR="${OUT:-$PWD/gpu_check_zero3_out}" RESUME=0 KEEP=0
while (($#)); do
    case "$1" in
        --cpu) CPU=1 ;;
        --model) MODEL="$2"; shift ;;
        --cache) CACHE="$2"; shift ;;
        --out) OUTDIR="$2"; shift ;;
        --with-resume) RESUME=1 ;;
        --keep-work) KEEP=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check_zero3.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

mkdir -p "$OUTDIR" || exit 1
OUTDIR="$(cd "$OUTDIR" && pwd)"
MD="$OUTDIR/gpu_check_zero3.md" CSV="$OUTDIR/gpu_check_zero3.csv"
rm -f "$MD" "$CSV"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_zero3.XXXXXX")" || exit 1
((KEEP)) || trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
((CPU)) && export CUDA_VISIBLE_DEVICES=""

skip() {  # a check that cannot run here is skipped, not failed
    printf '# DeepSpeed check (gpu_check_zero3.sh)\n\nskipped: %s\n' "$1" >"$MD"
    echo "gpu_check_zero3: skipped: $1"
    exit 0
}

"$PY" -c "import deepspeed" >/dev/null 2>&1 || skip "deepspeed is not importable (install it: see this script's header)"
if ((!CPU)); then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || skip "no CUDA device (--cpu runs the tiny CPU variant)"
fi
if ! "$PY" -c "import fastdpo.kernels" 2>/dev/null; then
    echo "+ fastdpo is not importable: pip install -e . (no deps, no index)"
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" || exit 1
fi
"$PY" -c "import datasets" 2>/dev/null || skip "datasets is not importable (fastdpo needs it: see this script's header)"

if ((CPU)); then
    PRESET=tiny DEVICE=cpu DTYPE=float32 BUILD_DTYPE=fp32 TOL=1e-4
    # every parameter partitioned, the tiny head too
    cat >"$WORK/ds_zero3.json" <<'EOF'
{"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                       "stage3_gather_16bit_weights_on_model_save": true},
 "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
EOF
    cat >"$WORK/zero3.yaml" <<EOF
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: $WORK/ds_zero3.json
  zero3_init_flag: true
machine_rank: 0
main_training_function: main
num_machines: 1
num_processes: 1
rdzv_backend: static
same_network: true
use_cpu: false
EOF
    ZERO3="$WORK/zero3.yaml"
else
    PRESET=qwen2.5-0.5b DEVICE=cuda DTYPE=bf16-mixed BUILD_DTYPE=bf16-mixed TOL=2e-2
    ZERO3="examples/accelerate/zero3.yaml"
fi
ZERO2="examples/accelerate/zero2.yaml"

t_start=$SECONDS
if [[ -z "$MODEL" ]]; then
    MODEL="$WORK/model"
    "$PY" benchmarks/gpu_check.py build-model --preset "$PRESET" --device "$DEVICE" --dtype "$BUILD_DTYPE" \
        --out "$MODEL" >"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; exit 1; }
fi
if [[ -z "$CACHE" ]]; then
    CACHE="$WORK/cache"
    "$PY" -m fastdpo precompute --model "$MODEL" --dataset fastdpo/demo_data/train.jsonl --limit 64 \
        --output "$CACHE" --no-progress >"$WORK/precompute.log" 2>&1 || { tail -20 "$WORK/precompute.log"; exit 1; }
fi
echo "gpu_check_zero3: model $MODEL, cache $CACHE ($((SECONDS - t_start))s)"

TRAIN=(-m fastdpo train --model "$MODEL" --ref-cache "$CACHE" --dtype "$DTYPE" --batch-size 2 --grad-accum 2
       --lr 1e-4 --seed 0 --no-progress --log-every 1)
LAUNCH=("$PY" -m accelerate.commands.launch --num_processes 1 --main_process_port 0)
declare -A RC SECS
run() {  # NAME ARGV...: one run, its log in WORK/NAME.log, its output in WORK/NAME
    local name=$1 t0=$SECONDS
    shift
    timeout -k 5 300 "$@" --output "$WORK/$name" >"$WORK/$name.log" 2>&1
    RC[$name]=$? SECS[$name]=$((SECONDS - t0))
    echo "gpu_check_zero3: $name exit ${RC[$name]} (${SECS[$name]}s)"
}
run plain "$PY" "${TRAIN[@]}" --max-steps 3
run plain-eager "$PY" "${TRAIN[@]}" --max-steps 3 --logps-backend eager
run zero3 "${LAUNCH[@]}" --config_file "$ZERO3" "${TRAIN[@]}" --max-steps 3
run zero3-eager "${LAUNCH[@]}" --config_file "$ZERO3" "${TRAIN[@]}" --max-steps 3 --logps-backend eager
run zero2 "${LAUNCH[@]}" --config_file "$ZERO2" "${TRAIN[@]}" --max-steps 3
RUNS="plain plain-eager zero3 zero3-eager zero2"
if ((RESUME)); then
    run zero3-full "${LAUNCH[@]}" --config_file "$ZERO3" "${TRAIN[@]}" --max-steps 4 --save-steps 2
    mkdir -p "$WORK/zero3-resume"
    cp -r "$WORK/zero3-full/checkpoint-2" "$WORK/zero3-resume/" 2>/dev/null
    head -2 "$WORK/zero3-full/metrics.jsonl" >"$WORK/zero3-resume/metrics.jsonl" 2>/dev/null
    run zero3-resume "${LAUNCH[@]}" --config_file "$ZERO3" "${TRAIN[@]}" --max-steps 4 --save-steps 2 --resume latest
    RUNS="$RUNS zero3-full zero3-resume"
fi
for r in $RUNS; do echo "$r ${RC[$r]} ${SECS[$r]}"; done >"$WORK/rc.txt"

"$PY" - "$WORK" "$MODEL" "$TOL" "$MD" "$CSV" "$((CPU))" <<'EOF'
"""Compare the runs (metrics.jsonl, saved models) and write the summary; exit 1 when a run failed."""
import csv, json, math, sys
from pathlib import Path

import torch
from safetensors.torch import load_file

work, model, tol, md, csv_path, cpu = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4], \
    sys.argv[5], sys.argv[6] == "1"
rc = {name: (int(code), secs) for name, code, secs in (line.split() for line in (work / "rc.txt").read_text().splitlines())}
# what each run is compared with (zero3-full, 4 steps on another schedule, is only the resumed run's reference)
BASE = {"plain-eager": "plain", "zero3": "plain", "zero3-eager": "plain-eager", "zero2": "plain",
        "zero3-resume": "zero3-full"}


def metrics(name):
    path = work / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def weights(path):
    files = sorted(Path(path).glob("*.safetensors"))
    out = {}
    for f in files:
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


init = weights(model)
head_key = "lm_head.weight" if "lm_head.weight" in init else "model.embed_tokens.weight"  # tied: the embedding
final = {name: weights(work / name) for name in rc if rc[name][0] == 0 and (work / name / "config.json").is_file()}


def head_dev(name, base):
    """||W_run - W_base|| / ||W_base - W_init|| of the head: 0 when it trained alike, 1 when it never moved."""
    if name not in final or base not in final:
        return math.nan
    w, b, i = final[name][head_key], final[base][head_key], init[head_key]
    return float((w - b).norm() / (b - i).norm().clamp_min(1e-30))


rows, floor = [], head_dev("plain-eager", "plain")
for name, (code, secs) in rc.items():
    base = BASE.get(name)
    row = {"run": name, "exit": code, "seconds": secs, "steps": "", "max_loss_diff": "", "grad_norm_rel_diff": "",
           "head_dev": "", "status": "ok"}
    log = (work / f"{name}.log").read_text(errors="replace") if (work / f"{name}.log").is_file() else ""
    m = metrics(name)
    row["steps"] = len(m)
    problems = []
    if code != 0:
        problems.append(f"exit {code}")
    if name.startswith("zero") and f"DeepSpeed ZeRO-{name[4]}" not in log:
        problems.append("DeepSpeed did not engage (no 'DeepSpeed ZeRO' line)")
    if base is not None and code == 0:
        ref = metrics(base)
        if name == "zero3-resume":  # steps 3.. of the resumed run against the uninterrupted run's
            pairs = [(a, b) for a, b in zip(ref, m) if a["step"] == b["step"] and b["step"] > 2]
        else:
            pairs = list(zip(ref, m))
        if not pairs or len(m) != len(ref):
            problems.append(f"{len(m)} steps, {base} has {len(ref)}")
        else:
            diff = max(abs(a["loss"] - b["loss"]) for a, b in pairs)
            gn = abs(pairs[0][1]["grad_norm"] - pairs[0][0]["grad_norm"]) / max(abs(pairs[0][0]["grad_norm"]), 1e-12)
            row.update(max_loss_diff=f"{diff:.2e}", grad_norm_rel_diff=f"{gn:.2e}")
            if not diff <= tol:
                problems.append(f"loss differs by {diff:.2e} > {tol:g}")
            if name != "zero3-resume" and not gn <= 0.05:
                problems.append(f"step-1 grad norm differs by {gn:.1%}")
        if name in ("zero3", "zero3-eager", "zero2"):
            dev, limit = head_dev(name, base), max(0.5, 2 * floor)
            row["head_dev"] = f"{dev:.2e}"
            if not dev <= limit:
                problems.append(f"head_dev {dev:.3f} > {limit:.3f}: the LM head did not train like plain's")
            if name in final and base in final:
                missing = sorted(k for k in final[base] if k not in final[name] or
                                 final[name][k].shape != final[base][k].shape)
                if missing:
                    problems.append(f"saved model lacks or reshapes {missing[:3]}")
    if problems:
        row["status"] = "failed: " + "; ".join(problems)
    rows.append(row)

with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
failed = [r for r in rows if r["status"] != "ok"]
lines = ["# DeepSpeed check (gpu_check_zero3.sh)", "",
         f"{'CPU, tiny model, float32' if cpu else 'GPU, qwen2.5-0.5b shape, bf16-mixed'}; loss tolerance {tol:g}; "
         f"plain-eager's head_dev against plain (the noise floor): {floor:.2e}", "",
         f"verdict: {'FAILED: ' + ', '.join(r['run'] for r in failed) if failed else 'ok'}", "",
         "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
for r in failed:
    log = (work / f"{r['run']}.log").read_text(errors="replace").splitlines()[-25:]
    lines += ["", f"## {r['run']}: the end of its log", "", "```", *log, "```"]
Path(md).write_text("\n".join(lines) + "\n")
print("\n".join(lines[:8 + len(rows)]))
sys.exit(1 if failed else 0)
EOF
status=$?
echo "gpu_check_zero3: $((SECONDS - t_start))s; summary $MD"
exit $status
