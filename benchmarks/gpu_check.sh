#!/usr/bin/env bash
# One GPU check in one call (issue 11): everything in fastdpo that only a GPU can check, in under 9 minutes of
# wall time, into one markdown summary and a few CSVs. Orchestration only: the measurements are
# benchmarks/bench_logps.py's, benchmarks/bench_train.py's and the tests'; benchmarks/gpu_check.py holds the glue.
#
# Stages, in order, with their time budgets on a GPU (seconds). Each runs under `timeout`, so one hang cannot eat
# the others' time; a stage may also use what the stages before it left unused, never what the ones after it are
# budgeted; a stage that fails is recorded in the summary and the next one runs. Total: 520 s + the summary.
# (logps gave 15 s and train-short and train-long 30 s each to the sharded stage: four model loads of the 0.5B
# shape and a precompute.)
#   setup        40  fastdpo importable (`pip install -e . --no-deps` if not), versions, peers present, and the
#                    Qwen2.5-0.5B-shaped model (random weights, bench_train's preset) the training stages share
#   cuda-tests   65  pytest tests/test_kernels_cuda.py tests/test_kernels.py -m "not integration" (compiled kernels,
#                    realistic vocabularies)
#   precision    30  the bf16 weight-change check of tests/test_precision.py on the GPU: float32, bf16-mixed,
#                    bfloat16 and auto (= bf16-mixed on a GPU), the fraction of weights 20 AdamW steps moved
#   logps       100  bench_logps.py at N = 16384, V = 151936, H = 896 (Qwen2.5-0.5B), bf16: the row kernel's HBM
#                    bandwidth as a fraction of the device's (forward, backward, full), then the fused head's
#                    forward + backward time and peak memory against eager, torch.compile'd eager, TRL's head,
#                    Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy
#   train-short  75  bench_train.py, qwen2.5-0.5b shape, bf16-mixed, short prompts: fastdpo packed and padded,
#                    the two-model baseline, TRL live and precompute (tokens/s, MFU, max_memory_allocated)
#   train-long   75  the same with long prompts
#   fit          60  bench_train's fit test (largest batch under a 20 GiB cap, long prompts, doubling from 4), one
#                    method after the other in order of importance, each with the time left (the stage also gets
#                    what the others left unused); fastdpo-packed first with adamw, adamw-kahan and adamw-8bit
#   sharded      75  3 DPO steps on the same model unsharded, then under FSDP2 (`--fsdp`, torchrun, 1 process),
#                    FSDP2 with `--fsdp-cpu-offload`, and DeepSpeed ZeRO-3 (`accelerate launch --config_file
#                    examples/accelerate/zero3.yaml`; needs the deepspeed wheel carried): losses against unsharded
# A missing peer (trl, liger-kernel, cut-cross-entropy) is a skipped row with its reason, never a failure.
# The budgets are estimates (this script has not run on a GPU yet): the summary's stage table has each stage's real
# seconds and its limit; tune with GPU_CHECK_BUDGETS="stage=seconds ...", keeping the sum under 9 minutes.
#
# How a session with the device tool (H100/H200) runs it. The image has torch, triton, transformers, accelerate,
# peft, pyarrow, pandas and pytest, but not datasets (fastdpo needs it), trl, liger-kernel or cut-cross-entropy:
# carry their wheels (2.7 MB). Once, here, in the repository's root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
# then ONE call of the device tool's `run`, with carry [".whl"] and timeout_s 600:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_check.sh
# For the sharded stage's ZeRO-3 row, add deepspeed's wheel and its dependencies to .whl as
# benchmarks/gpu_check_zero3.sh's header says (without them that row is skipped); gpu_check_zero3.sh itself is the
# deeper DeepSpeed check (ZeRO-2 and 3, eager and fused heads, resume), a separate call of about 3 minutes.
# The setup stage lists any requirement of those wheels the image does not meet (datasets 5.2 wants pyarrow >= 24
# and fsspec <= 2026.9.0: if it says otherwise, download those wheels too and rerun).
# Outputs go to $OUT (--out DIR elsewhere): gpu_check.md (the summary: a section per stage, its status and time),
# logps.csv, train.csv (short and long), fit.csv, precision.csv, sharded.csv and gpu_check_logs.txt (the end of
# every log) -- seven files in one folder, within the tool's 8 files of at most 16 MiB, no deeper than 2 folders.
# A second call can rerun some stages: `bash benchmarks/gpu_check.sh --stages logps,fit` (setup always runs).
#
# --dry-run: every stage on CPU with tiny shapes and presets (Triton's interpreter, TRITON_INTERPRET=1), the same
# summary layout, in under 2 minutes on a 2-core CPU; tests/test_gpu_check.py runs it in CI:
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gc
#
# Options: --dry-run, --out DIR (default $OUT, else ./gpu_check_out), --stages a,b,c, --keep-work (keep the work
# directory: bench outputs, models, full logs). Environment: PYTHON (default python3), GPU_CHECK_BUDGETS
# ("stage=seconds ..." overrides), FIT_BUDGET_GB (20). Exit status: 0 when no stage failed.

set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/.." && pwd)"
cd "$REPO" || exit 1
PY="${PYTHON:-python3}"
STAGES=(setup cuda-tests precision logps train-short train-long fit sharded)
NEEDS_DATASETS=" precision train-short train-long fit sharded "  # fastdpo loads its data with `datasets`

# ----------------------------------------------------------------------------------------------------------------
# stage bodies (run as `bash gpu_check.sh __stage NAME` under timeout, with GPU_CHECK_* in the environment)
# ----------------------------------------------------------------------------------------------------------------

dry() { [[ "${GPU_CHECK_DRY:-0}" == 1 ]]; }
W() { echo "$GPU_CHECK_WORK"; }

stage_setup() {
    if ! "$PY" -c "import fastdpo.kernels" 2>/dev/null; then
        echo "+ fastdpo is not importable: pip install -e . (no deps, no index)"
        "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" || return 1
    fi
    if [[ "${GPU_CHECK_NEED_MODEL:-1}" == 0 ]]; then  # --stages without a training stage: no model to build
        "$PY" benchmarks/gpu_check.py env --out "$(W)/env.json"
    elif dry; then
        "$PY" benchmarks/gpu_check.py setup --env-out "$(W)/env.json" --preset tiny --device cpu --dtype fp32 \
            --out "$(W)/tiny"
    else
        "$PY" benchmarks/gpu_check.py setup --env-out "$(W)/env.json" --preset qwen2.5-0.5b --device cuda \
            --dtype bf16-mixed --out "$(W)/qwen2.5-0.5b"
    fi
}

stage_cuda_tests() {
    local sel=()
    dry && sel=(-k "float32 and (token_logps or sequence_logps)")  # a few interpreted kernels: seconds, not minutes
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rfEs tests/test_kernels_cuda.py tests/test_kernels.py \
        -m "not integration" "${sel[@]}"
}

stage_precision() {
    "$PY" benchmarks/gpu_check.py precision --out "$(W)/precision"
}

logps_run() {  # NAME SECONDS PROVIDERS/MODES...: one bench_logps.py run under its own limit
    local name=$1 limit=$2 rc=0
    shift 2
    ((limit >= 2)) || { echo "gpu_check: no time left for the $name run"; return 124; }  # (timeout 0: no limit)
    timeout -k 5 "$limit" "$PY" benchmarks/bench_logps.py "${LOGPS_SHAPE[@]}" "$@" --out "$(W)/logps_$name" \
        --note "gpu_check.sh" || { rc=$?; echo "gpu_check: the $name run: exit $rc"; }
    return $rc
}

stage_logps() {
    # three runs, each under its own limit (bench_logps writes its CSV at the end: a slow compile must not take
    # the other rows with it)
    local rc=0 start=$SECONDS
    if dry; then
        LOGPS_SHAPE=(--vocab 500 --tokens 64 --hidden 32 --seq-len 32 --dtype fp32 --device cpu --reps 2 --warmup 1)
    else
        LOGPS_SHAPE=(--vocab 151936 --tokens 16384 --hidden 896 --seq-len 1024 --dtype bf16 --device cuda --reps 10
                     --warmup 3)
    fi
    left() { echo $((GPU_CHECK_ALLOWED - (SECONDS - start) - 8)); }
    # the logits workload: the row kernel's bandwidth, eager and Liger's cross-entropy beside it
    logps_run logits "$((GPU_CHECK_ALLOWED * 30 / 100))" --providers fastdpo-triton eager liger-ce \
        --modes forward backward full || rc=$?
    # the head workload, forward + backward: the fused head against eager and the peers
    logps_run head "$(($(left) / 2))" --providers fastdpo-linear fastdpo-linear-loss eager-head trl-head liger-linear \
        cce-linear \
        --modes full || rc=$?
    # torch.compile of eager, for both workloads (its compile time is not in the medians: warm-up runs first)
    logps_run compile "$(left)" --providers compile compile-head --modes full || rc=$?
    return $rc
}

stage_train() {  # $1: short|long
    local args methods=(fastdpo-packed fastdpo-padded two-model trl-live trl-precompute)
    if dry; then
        args=(--model "$(W)/tiny" --data "$1" --device cpu --dtype fp32 --steps 2 --warmup 1 --batch-size 2)
        if [[ $1 == long ]]; then args+=(--prompt-len 48 --completion-len 6)
        else args+=(--prompt-len 12 --completion-len 12); fi
        # each method once, split between the two runs (a CPU worker costs ~6 s of imports and loading)
        methods=(fastdpo-packed two-model trl-precompute)
        [[ $1 == long ]] && methods=(fastdpo-padded trl-live)
    else
        args=(--model "$(W)/qwen2.5-0.5b" --data "$1" --device cuda --dtype bf16-mixed --steps 10 --warmup 3
              --batch-size 8)
    fi
    "$PY" benchmarks/bench_train.py "${args[@]}" --methods "${methods[@]}" --out "$(W)/train_$1" \
        --note "gpu_check.sh"
}

stage_fit() {
    if dry; then
        "$PY" benchmarks/gpu_check.py fit --deadline-s "$((GPU_CHECK_ALLOWED - 5))" --model "$(W)/tiny" \
            --data short --prompt-len 12 --completion-len 12 --device cpu --dtype fp32 --steps 2 --warmup 1 \
            --batch-size 2 --methods fastdpo-packed two-model --fit-budget-gb 16 --fit-start-batch 1 \
            --fit-max-batch 1 --fit-steps 1 --fit-optimizers adamw --out "$(W)/fit"
    else
        "$PY" benchmarks/gpu_check.py fit --deadline-s "$((GPU_CHECK_ALLOWED - 10))" --model "$(W)/qwen2.5-0.5b" \
            --data long --device cuda --dtype bf16-mixed --steps 2 --warmup 1 --batch-size 4 \
            --methods fastdpo-packed two-model trl-precompute fastdpo-padded trl-live \
            --fit-budget-gb "${FIT_BUDGET_GB:-20}" --fit-start-batch 4 --fit-max-batch 64 --fit-steps 2 \
            --fit-optimizers adamw,adamw-kahan,adamw-8bit --out "$(W)/fit"
    fi
}

stage_sharded() {
    if dry; then
        "$PY" benchmarks/gpu_check.py sharded --model "$(W)/tiny" --dtype float32 --steps 2 \
            --deadline-s "$((GPU_CHECK_ALLOWED - 5))" --out "$(W)/sharded"
    else
        "$PY" benchmarks/gpu_check.py sharded --model "$(W)/qwen2.5-0.5b" --dtype bf16-mixed --steps 3 \
            --deadline-s "$((GPU_CHECK_ALLOWED - 15))" --out "$(W)/sharded"
    fi
}

if [[ "${1:-}" == "__stage" ]]; then
    case "$2" in
        setup) stage_setup ;;
        cuda-tests) stage_cuda_tests ;;
        precision) stage_precision ;;
        logps) stage_logps ;;
        train-short) stage_train short ;;
        train-long) stage_train long ;;
        fit) stage_fit ;;
        sharded) stage_sharded ;;
        *) echo "unknown stage $2" >&2; exit 2 ;;
    esac
    exit $?
fi

# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------

DRY=0 OUTDIR="${OUT:-$PWD/gpu_check_out}" ONLY="" KEEP=0
while (($#)); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUTDIR="$2"; shift ;;
        --out=*) OUTDIR="${1#--out=}" ;;
        --stages) ONLY="$2"; shift ;;
        --stages=*) ONLY="${1#--stages=}" ;;
        --keep-work) KEEP=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

declare -A BUDGET
MODEL=qwen2.5-0.5b
((DRY)) && MODEL=tiny
if ((DRY)); then  # generous: a loaded CI machine must not time a stage out; the whole takes ~1.5 min
    BUDGET=([setup]=40 [cuda-tests]=60 [precision]=60 [logps]=60 [train-short]=120 [train-long]=90 [fit]=90
            [sharded]=120)
else
    BUDGET=([setup]=40 [cuda-tests]=65 [precision]=30 [logps]=100 [train-short]=75 [train-long]=75 [fit]=60
            [sharded]=75)
fi
for kv in ${GPU_CHECK_BUDGETS:-}; do BUDGET[${kv%%=*}]=${kv#*=}; done
TOTAL=0
for s in "${STAGES[@]}"; do TOTAL=$((TOTAL + BUDGET[$s])); done

mkdir -p "$OUTDIR" || exit 1
OUTDIR="$(cd "$OUTDIR" && pwd)"
rm -f "$OUTDIR"/{gpu_check.md,gpu_check_logs.txt,logps.csv,train.csv,fit.csv,precision.csv,sharded.csv}
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 1
mkdir -p "$WORK/logs"
((KEEP)) || trap 'rm -rf "$WORK"' EXIT

export GPU_CHECK_DRY=$DRY GPU_CHECK_WORK=$WORK PYTHON=$PY GPU_CHECK_NEED_MODEL=1
[[ -n "$ONLY" && ",$ONLY," != *,train-short,* && ",$ONLY," != *,train-long,* && ",$ONLY," != *,fit,* \
   && ",$ONLY," != *,sharded,* ]] \
    && GPU_CHECK_NEED_MODEL=0
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TQDM_DISABLE=1
if ((DRY)); then
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1  # CPU, wherever it runs; Triton kernels interpreted
else
    unset TRITON_INTERPRET
fi

START=$(date +%s)
DEADLINE=$((START + TOTAL))
FAILED=0
echo "gpu_check: $( ((DRY)) && echo "dry run (CPU, tiny)" || echo GPU ), budget ${TOTAL}s, work $WORK -> $OUTDIR"

record() {  # name status seconds allowed note
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$WORK/stages.tsv"
    printf 'gpu_check: %-12s %-45s %5ss (allowed %ss)\n' "$1" "$2" "$3" "$4"
}

env_has() {  # a python expression over env.json's dict `e`
    [[ -f "$WORK/env.json" ]] && "$PY" -c "import json, sys; e = json.load(open(sys.argv[1])); sys.exit(0 if ($1) else 1)" \
        "$WORK/env.json" 2>/dev/null
}

for i in "${!STAGES[@]}"; do
    name=${STAGES[$i]}
    later=0
    for ((j = i + 1; j < ${#STAGES[@]}; j++)); do later=$((later + BUDGET[${STAGES[$j]}])); done
    allowed=$((DEADLINE - $(date +%s) - later))
    if [[ -n "$ONLY" && "$name" != setup && ",$ONLY," != *",$name,"* ]]; then
        record "$name" "skipped: not selected (--stages $ONLY)" 0 0
        continue
    fi
    if [[ "$name" != setup ]] && ! env_has "e.get('fastdpo')"; then
        record "$name" "skipped: setup failed (fastdpo not importable)" 0 0
        continue
    fi
    if [[ "$name" != setup ]] && ((!DRY)) && ! env_has "e.get('cuda')"; then
        record "$name" "skipped: no CUDA device (use --dry-run on a CPU)" 0 0
        continue
    fi
    if [[ "$NEEDS_DATASETS" == *" $name "* ]] && ! env_has "e['versions'].get('datasets')"; then
        record "$name" "skipped: datasets not installed (fastdpo needs it; carry its wheel, see the header)" 0 0
        continue
    fi
    if [[ "$name" == train-* || "$name" == fit || "$name" == sharded ]] && [[ ! -f "$WORK/$MODEL/config.json" ]]; then
        record "$name" "skipped: no model (setup failed to build it)" 0 0
        continue
    fi
    if ((allowed < 10)); then
        record "$name" "skipped: no time left" 0 "$allowed"
        continue
    fi
    t0=$(date +%s%N)
    GPU_CHECK_ALLOWED=$allowed timeout -k 5 "$allowed" bash "$SELF" __stage "$name" >"$WORK/logs/$name.log" 2>&1
    rc=$?
    secs=$(( ($(date +%s%N) - t0) / 1000000000 ))
    case $rc in
        0) status=ok ;;
        124 | 137) if ((secs >= allowed - 1)); then status="failed: timed out after ${allowed}s"
                   else status="failed: exit $rc (a step inside it timed out; see its log)"; fi ;;
        *) status="failed: exit $rc" ;;
    esac
    [[ $status == ok ]] || FAILED=1
    record "$name" "$status" "$secs" "$allowed"
done

WALL=$(($(date +%s) - START))
"$PY" benchmarks/gpu_check.py summary --work "$WORK" --out "$OUTDIR" --mode "$( ((DRY)) && echo dry-run || echo gpu)" \
    --command "bash benchmarks/gpu_check.sh $( ((DRY)) && echo --dry-run)${ONLY:+ --stages $ONLY}" --wall-s "$WALL" \
    || FAILED=1  # also when a stage whose command succeeded failed on what it measured (the summary's verdict)
echo "gpu_check: ${WALL}s; summary $OUTDIR/gpu_check.md"
exit $FAILED
