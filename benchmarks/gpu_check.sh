#!/usr/bin/env bash
# The GPU check: everything in fastdpo that only a GPU can measure, on any CUDA machine (written for one H100/H200),
# in two self-contained calls of at most 7 minutes of stage budgets each. Orchestration only: the measurements are
# benchmarks/bench_logps.py's, bench_train.py's, bench_fit.py's, gpu_check.py's and the tests'.
#
#   bash benchmarks/gpu_check.sh --call 1 --out OUT1    # setup, CUDA tests, precision, log-prob kernels and heads
#   bash benchmarks/gpu_check.sh --call 2 --out OUT2    # setup (+ model), training short and long, fit, sharded
#
# Stage budgets on a GPU, seconds (estimates: nothing here has run on a GPU yet; the summary has each stage's real
# seconds beside its budget). Only the selected stages count; each stage runs with the time left (what the stages
# before it did not use, less what the stages after it are budgeted), its children with a timeout of the time left,
# and it writes every row the moment it is measured, so a stage cut at its limit keeps all its finished rows and
# marks the rest `cut (budget)`.
#   call 1 (395 s)
#     setup         20  fastdpo importable (`pip install -e . --no-deps` if not), versions, which peers and optimizer
#                       libraries are installed (no model: call 1 needs none)
#     cuda-tests    90  pytest tests/test_kernels_cuda.py tests/test_kernels.py -m "not integration" (compiled kernels)
#     precision     45  tests/test_precision.py's bf16 weight-change check on the GPU (SDPA: no FlexAttention
#                       compile): float32, bf16-mixed, bfloat16, auto; 20 AdamW steps each
#     logps        240  bench_logps.py at N = 16384, V = 151936, H = 896 (Qwen2.5-0.5B), bf16, inputs made on the GPU:
#                       a device copy (the measured bandwidth), the row kernel forward / backward / full; then, full
#                       mode: eager, the fused head and fused loss beside Liger (reduction none / sum), Cut
#                       Cross-Entropy exact and filtered, TRL's head, Liger's cross-entropy, torch.compile last
#   call 2 (420 s)
#     setup         45  as above, and the Qwen2.5-0.5B-shaped model (random weights) the training stages share
#     train-short  120  bench_train.py, bf16-mixed, short prompts, 10 steps of batch 8: two-model (baseline), fastdpo
#                       packed, TRL precompute, fastdpo padded, TRL live (first step / compile reported apart)
#     train-long   100  the same with long prompts: two-model, fastdpo packed, fastdpo padded, TRL precompute
#     fit           90  bench_fit.py, long prompts, 20 GiB cap, doubling from batch 8: fastdpo-packed with adamw,
#                       adamw-kahan, adamw-8bit, then two-model and TRL precompute with adamw
#     sharded       65  3 DPO steps unsharded, then FSDP2 (torchrun, 1 process), DeepSpeed ZeRO-3 (accelerate
#                       launch), FSDP2 with CPU offload: each run's losses against the unsharded run's
# A missing peer (trl, liger-kernel, cut-cross-entropy, bitsandbytes, torch-optimi, deepspeed) is a skipped row with
# its reason, never a failure. Override budgets with GPU_CHECK_BUDGETS="stage=seconds ...".
#
# Install, on a CUDA machine with torch, triton, transformers, accelerate and pytest (in the repository's root):
#   with network:     pip install -e ".[bench]" bitsandbytes torch-optimi
#   without network:  download the wheels elsewhere (same Python, x86-64 Linux) and bring the folder with the code:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#         --platform manylinux2014_x86_64 -d wheels datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0 \
#         liger-kernel==0.8.5 cut-cross-entropy==25.1.1 bitsandbytes torch-optimi
#     then, on the machine:
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl && export PYTHONPATH=/tmp/site
#   (deepspeed ships no wheel: gpu_check_zero3.sh's header says how to build one; without it the ZeRO-3 row is
#   skipped.) The setup stage installs fastdpo itself (`pip install -e . --no-deps`) when it is not importable and
#   lists any requirement of the installed wheels that is not met (datasets 5.2 wants pyarrow >= 24, fsspec <= 2026.9).
#
# Outputs, flat in --out (default $OUT, else ./gpu_check_out), written as the run goes: gpu_check_callN.md (the
# summary: a section per stage and the log tails; rewritten every ~20 s, on SIGTERM and at the end),
# console_callN.txt (this script's console), and the stages' CSVs and markdown: call 1 precision.{csv,md},
# logps.{csv,md}; call 2 train.{csv,md} (both training stages), fit.{csv,md}, sharded.{csv,md}.
#
# --dry-run: every stage on CPU with tiny shapes (Triton's interpreter, the `micro` preset, few repeats, three
# training methods, one fit search); it checks the plumbing, not numbers (tests/test_bench_*.py test the scripts). tests/test_gpu_check.py runs it:
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gc
#
# Options: --call 1|2 (default: both calls' stages in one run), --stages a,b (setup always runs), --dry-run,
# --out DIR, --keep-work (keep the work directory: models, per-run logs). Environment: PYTHON (python3),
# GPU_CHECK_BUDGETS, FIT_BUDGET_GB (20). Exit status: 0 when no stage failed, 143 on SIGTERM.

set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/.." && pwd)"
cd "$REPO" || exit 1
PY="${PYTHON:-python3}"
ALL=(setup cuda-tests precision logps train-short train-long fit sharded)
CALL1=" setup cuda-tests precision logps "
CALL2=" setup train-short train-long fit sharded "
NEEDS_DATASETS=" precision train-short train-long fit sharded "  # fastdpo loads its data with `datasets`
NEEDS_MODEL=" train-short train-long fit sharded "

# ----------------------------------------------------------------------------------------------------------------
# stage bodies (`bash gpu_check.sh __stage NAME` under timeout, GPU_CHECK_* in the environment)
# ----------------------------------------------------------------------------------------------------------------

dry() { [[ "${GPU_CHECK_DRY:-0}" == 1 ]]; }
W() { echo "$GPU_CHECK_WORK"; }
M() { dry && echo "$GPU_CHECK_WORK/micro" || echo "$GPU_CHECK_WORK/qwen2.5-0.5b"; }  # the model the stages share
O() { echo "$GPU_CHECK_OUT"; }
left() { echo $((GPU_CHECK_END - $(date +%s))); }  # the stage's seconds left, less a margin to write its rows

stage_setup() {
    if ! "$PY" -c "import fastdpo.kernels" 2>/dev/null; then
        echo "+ fastdpo is not importable: pip install -e . (no deps, no index)"
        "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" || return 1
    fi
    if [[ "$GPU_CHECK_NEED_MODEL" == 0 ]]; then
        "$PY" benchmarks/gpu_check.py env --out "$(W)/env.json"
    elif dry; then
        "$PY" benchmarks/gpu_check.py setup --env-out "$(W)/env.json" --preset micro --device cpu --dtype fp32 \
            --out "$(M)"
    else
        "$PY" benchmarks/gpu_check.py setup --env-out "$(W)/env.json" --preset qwen2.5-0.5b --device cuda \
            --dtype bf16-mixed --out "$(M)"
    fi
}

stage_cuda_tests() {
    local sel=()
    dry && sel=(-k "float32 and (token_logps or sequence_logps)")  # a few interpreted kernels: seconds, not minutes
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rfEs tests/test_kernels_cuda.py tests/test_kernels.py \
        -m "not integration" "${sel[@]}"
}

stage_precision() {
    local steps=20
    dry && steps=3  # AdamW's first step already moves every weight; plain bf16 AdamW rounds lr 1e-6 away
    "$PY" benchmarks/gpu_check.py precision --steps $steps --time-limit-s "$(left)" --out "$(O)/precision"
}

stage_logps() {
    local shape rc=0
    if dry; then
        "$PY" benchmarks/bench_logps.py --vocab 500 --tokens 64 --hidden 32 --seq-len 32 --dtype fp32 --device cpu \
            --reps 2 --warmup 1 --modes full --providers copy fastdpo-triton eager fastdpo-linear fastdpo-linear-loss \
            eager-head cce-linear cce-linear-filtered trl-head compile \
            --time-limit-s "$(left)" --out "$(O)/logps" --note "gpu_check.sh --dry-run"
        return
    fi
    shape=(--vocab 151936 --tokens 16384 --hidden 896 --seq-len 1024 --dtype bf16 --device cuda --reps 10 --warmup 3)
    # the row kernel's bandwidth in every mode, then the heads in full mode, by importance (torch.compile last)
    "$PY" benchmarks/bench_logps.py "${shape[@]}" --providers copy fastdpo-triton --modes forward backward full \
        --time-limit-s "$(($(left) * 30 / 100))" --out "$(O)/logps" --note "gpu_check.sh" || rc=$?
    "$PY" benchmarks/bench_logps.py "${shape[@]}" --modes full --providers copy eager fastdpo-linear eager-head \
        liger-linear fastdpo-linear-loss liger-linear-sum cce-linear cce-linear-filtered trl-head liger-ce \
        compile compile-head --time-limit-s "$(left)" --append --out "$(O)/logps" --note "gpu_check.sh" || rc=$?
    return $rc
}

stage_train() {  # $1: short|long
    local args methods
    if dry; then
        args=(--device cpu --dtype fp32 --steps 2 --warmup 1 --batch-size 2)
        if [[ $1 == long ]]; then args+=(--prompt-len 48 --completion-len 6); methods=(fastdpo-padded)
        else args+=(--prompt-len 12 --completion-len 12); methods=(two-model fastdpo-packed); fi
    else
        args=(--device cuda --dtype bf16-mixed --steps 10 --warmup 3 --batch-size 8)
        methods=(two-model fastdpo-packed trl-precompute fastdpo-padded trl-live)
        [[ $1 == long ]] && methods=(two-model fastdpo-packed fastdpo-padded trl-precompute)
    fi
    "$PY" benchmarks/bench_train.py --model "$(M)" --data "$1" "${args[@]}" --methods "${methods[@]}" \
        --no-plot --append --time-limit-s "$(left)" --out "$(O)/train" --logs "$(W)/train_$1_logs" \
        --note "gpu_check.sh"
}

stage_fit() {
    local args
    if dry; then
        args=(--data short --prompt-len 12 --completion-len 12 --device cpu --dtype fp32 --batch-size 1
              --methods fastdpo-packed --fit-budget-gb 16 --fit-start-batch 1 --fit-max-batch 1
              --fit-optimizers adamw)
    else
        args=(--data long --device cuda --dtype bf16-mixed --batch-size 4 --methods fastdpo-packed two-model
              trl-precompute --fit-budget-gb "${FIT_BUDGET_GB:-20}" --fit-start-batch 8 --fit-max-batch 64
              --fit-optimizers adamw,adamw-kahan,adamw-8bit)
    fi
    "$PY" benchmarks/bench_fit.py --model "$(M)" --steps 1 --fit-steps 1 "${args[@]}" \
        --time-limit-s "$(left)" --out "$(O)/fit" --logs "$(W)/fit_logs" --note "gpu_check.sh"
}

stage_sharded() {
    if dry; then
        "$PY" benchmarks/gpu_check.py sharded --model "$(M)" --dtype float32 --steps 2 \
            --variants unsharded fsdp2 fsdp2-offload --time-limit-s "$(left)" --out "$(O)/sharded"
    else
        "$PY" benchmarks/gpu_check.py sharded --model "$(M)" --dtype bf16-mixed --steps 3 \
            --time-limit-s "$(left)" --out "$(O)/sharded"
    fi
}

if [[ "${1:-}" == "__stage" ]]; then
    # SIGTERM reaches the whole stage (timeout signals its process group): let the running script write its cut
    # rows and exit before this shell does, so that the driver's summary comes after them
    trap 'exit 143' TERM
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

DRY=0 OUTDIR="${OUT:-$PWD/gpu_check_out}" ONLY="" KEEP=0 CALL=""
while (($#)); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUTDIR="$2"; shift ;;
        --out=*) OUTDIR="${1#--out=}" ;;
        --call) CALL="$2"; shift ;;
        --call=*) CALL="${1#--call=}" ;;
        --stages) ONLY="$2"; shift ;;
        --stages=*) ONLY="${1#--stages=}" ;;
        --keep-work) KEEP=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ -z "$CALL" || "$CALL" == 1 || "$CALL" == 2 ]] || { echo "gpu_check.sh: --call must be 1 or 2, not $CALL" >&2; exit 2; }

SELECTED=()
for s in "${ALL[@]}"; do
    if [[ -n "$ONLY" ]]; then [[ $s == setup || ",$ONLY," == *",$s,"* ]] && SELECTED+=("$s")
    elif [[ "$CALL" == 1 ]]; then [[ "$CALL1" == *" $s "* ]] && SELECTED+=("$s")
    elif [[ "$CALL" == 2 ]]; then [[ "$CALL2" == *" $s "* ]] && SELECTED+=("$s")
    else SELECTED+=("$s"); fi
done
for s in ${ONLY//,/ }; do
    [[ " ${ALL[*]} " == *" $s "* ]] || { echo "gpu_check.sh: --stages: unknown stage $s (of ${ALL[*]})" >&2; exit 2; }
done

declare -A BUDGET
if ((DRY)); then  # generous: a loaded CI machine must not cut a stage
    BUDGET=([setup]=60 [cuda-tests]=60 [precision]=60 [logps]=90 [train-short]=120 [train-long]=90 [fit]=90
            [sharded]=90)
else
    BUDGET=([setup]=20 [cuda-tests]=90 [precision]=45 [logps]=240 [train-short]=120 [train-long]=100 [fit]=90
            [sharded]=65)
    [[ "$CALL" == 1 ]] || BUDGET[setup]=45  # it builds the model too
fi
for kv in ${GPU_CHECK_BUDGETS:-}; do BUDGET[${kv%%=*}]=${kv#*=}; done
TOTAL=0
for s in "${SELECTED[@]}"; do TOTAL=$((TOTAL + BUDGET[$s])); done
NEED_MODEL=0
for s in "${SELECTED[@]}"; do [[ "$NEEDS_MODEL" == *" $s "* ]] && NEED_MODEL=1; done

mkdir -p "$OUTDIR" || exit 1
OUTDIR="$(cd "$OUTDIR" && pwd)"
SUFFIX="${CALL:+_call$CALL}"
SUMMARY="gpu_check$SUFFIX.md" CONSOLE="console$SUFFIX.txt"
rm -f "$OUTDIR/$SUMMARY" "$OUTDIR/$CONSOLE"
for s in "${SELECTED[@]}"; do  # this run's outputs only: the other call's stay
    case $s in precision | logps | fit | sharded) rm -f "$OUTDIR/$s".{csv,md} ;; train-*) rm -f "$OUTDIR"/train.{csv,md} ;; esac
done
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 1
mkdir -p "$WORK/logs"
exec > >(tee -a "$OUTDIR/$CONSOLE") 2>&1  # the console, into the output folder as it goes

export GPU_CHECK_DRY=$DRY GPU_CHECK_WORK=$WORK GPU_CHECK_OUT=$OUTDIR GPU_CHECK_NEED_MODEL=$NEED_MODEL PYTHON=$PY
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TQDM_DISABLE=1
if ((DRY)); then
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1  # CPU, wherever it runs; Triton kernels interpreted
else
    unset TRITON_INTERPRET
fi

START=$(date +%s)
DEADLINE=$((START + TOTAL))
echo "$START" >"$WORK/started"
COMMAND="bash benchmarks/gpu_check.sh$( ((DRY)) && echo " --dry-run")${CALL:+ --call $CALL}${ONLY:+ --stages $ONLY}"
MODE=$( ((DRY)) && echo dry-run || echo gpu)
echo "gpu_check: $MODE, stages ${SELECTED[*]}, budget ${TOTAL}s, work $WORK -> $OUTDIR"

summary() {  # [--final]
    "$PY" benchmarks/gpu_check_summary.py --work "$WORK" --out "$OUTDIR" --name "$SUMMARY" --mode "$MODE" \
        --command "$COMMAND" "$@"
}
# the refresher: away from the console (a lingering `sleep` must not hold the output pipe open after the end)
( trap 'kill "$nap" 2>/dev/null; exit 0' TERM; while :; do sleep 20 & nap=$!; wait "$nap"; summary; done ) \
    >/dev/null 2>&1 &
REFRESH=$!
STAGE_PID=""
finish() {  # $1: exit status
    kill "$REFRESH" 2>/dev/null
    wait "$REFRESH" 2>/dev/null
    summary --final || [[ $1 != 0 ]] || set -- 1  # also when a stage whose command succeeded failed on its rows
    echo "gpu_check: $(($(date +%s) - START))s; summary $OUTDIR/$SUMMARY"
    ((KEEP)) && echo "gpu_check: work kept in $WORK" || rm -rf "$WORK"
    exit "$1"
}
on_term() {
    echo "gpu_check: SIGTERM: stopping the running stage (it writes its finished rows), then the summary"
    if [[ -n "$STAGE_PID" ]]; then
        kill -TERM "$STAGE_PID" 2>/dev/null
        wait "$STAGE_PID" 2>/dev/null
        record "$CURRENT" "failed: stopped by SIGTERM" $(($(date +%s) - T0)) "$ALLOWED"
    fi
    rm -f "$WORK/current"
    finish 143
}
trap on_term TERM INT

record() {  # name status seconds allowed
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/stages.tsv"
    printf 'gpu_check: %-12s %-45s %5ss (allowed %ss)\n' "$1" "$2" "$3" "$4"
}

env_has() {  # a python expression over env.json's dict `e`
    [[ -f "$WORK/env.json" ]] && "$PY" -c "import json, sys; e = json.load(open(sys.argv[1])); sys.exit(0 if ($1) else 1)" \
        "$WORK/env.json" 2>/dev/null
}

FAILED=0
for i in "${!SELECTED[@]}"; do
    name=${SELECTED[$i]}
    later=0
    for ((j = i + 1; j < ${#SELECTED[@]}; j++)); do later=$((later + BUDGET[${SELECTED[$j]}])); done
    ALLOWED=$((DEADLINE - $(date +%s) - later))
    reason=""
    if [[ "$name" != setup ]] && ! env_has "e.get('fastdpo')"; then reason="setup failed (fastdpo not importable)"
    elif [[ "$name" != setup ]] && ((!DRY)) && ! env_has "e.get('cuda')"; then reason="no CUDA device (use --dry-run)"
    elif [[ "$NEEDS_DATASETS" == *" $name "* ]] && ! env_has "e['versions'].get('datasets')"; then
        reason="datasets not installed (fastdpo needs it; see the header: the wheels to bring)"
    elif [[ "$NEEDS_MODEL" == *" $name "* ]] && ! compgen -G "$WORK/*/config.json" >/dev/null; then
        reason="no model (setup failed)"
    elif ((ALLOWED < 10)); then reason="no time left"
    fi
    if [[ -n "$reason" ]]; then record "$name" "skipped: $reason" 0 "$ALLOWED"; continue; fi
    CURRENT=$name T0=$(date +%s)
    printf '%s\t%s\t%s\n' "$name" "$T0" "$ALLOWED" >"$WORK/current"
    margin=$( ((DRY)) && echo 3 || echo 8 )  # for the stage to write its cut rows before `timeout` kills it
    GPU_CHECK_END=$((T0 + ALLOWED - margin)) timeout -k 5 "$ALLOWED" bash "$SELF" __stage "$name" \
        >"$WORK/logs/$name.log" 2>&1 &
    STAGE_PID=$!
    wait "$STAGE_PID"
    rc=$?
    STAGE_PID=""
    secs=$(($(date +%s) - T0))
    case $rc in
        0) status=ok ;;
        124 | 137) status="failed: timed out after ${ALLOWED}s" ;;
        *) status="failed: exit $rc" ;;
    esac
    [[ $status == ok ]] || FAILED=1
    rm -f "$WORK/current"
    record "$name" "$status" "$secs" "$ALLOWED"
    summary 2>/dev/null
done
finish $FAILED
