#!/usr/bin/env bash
# One GPU session on a bare CUDA machine (issue 25): install hooklens against the machine's own torch/triton,
# build the C++ extension, then phases in order of value, all in ONE device call (a session has 15 minutes of
# device time in all, starting the machine included):
#
#   HOOKLENS_COMMIT=$(git rev-parse --short HEAD) OUT=$OUT bash docs/perf-log/gpu_session.sh   # carry .whl
#
# `setup` (install + C++ build, ~65 s on an H100 machine) always runs first. Then, by default, the target rows
# first (issue 25's table), then correctness, then the rest:
#   t_sweeps exact t_ov t_attn t_bf16 cpp_errors kernels tests tune attention core circuits sweeps bf16
# (`exact`, ~1-3 min predicted on an H100 from its FLOP floor, comes early because its row is written only at its
# end and a later start could leave it too little time)
# or any phases named on the command line: setup, tests, kernels, cpp_errors (check_cpp_errors.py), tune
# (tune_attention.py), exact (circuit_exact_all_edges: benchmarks/circuits_exact.py --all-edges) and the benchmark
# groups below. SESSION_LIMIT (seconds, default 400) bounds all phases after setup together: each phase runs under
# `timeout` with the smaller of its own limit and the time left, and a phase is skipped once less than 30 s are
# left, so the call ends within setup + SESSION_LIMIT (~8 minutes) whatever hangs. Phase times seen on an H100
# (2026-11-22): kernels 120 s, tests 82 s (-n 15), tune (bf16 only) ~60 s, attention 63 s, bf16 24 s, core 75 s;
# sweeps ~200 s (TL's 2160 forwards in head_out_by_pos), circuits ~120 s.
#
# DRY_RUN=1 runs the same flow on this machine's CPU (no install or build, PYTHON's environment as it is, small
# shapes for `exact`, each phase cut at 40 s), to check the script and every workload name before a device call:
#   DRY_RUN=1 PYTHON=.venv/bin/python SESSION_LIMIT=120 bash docs/perf-log/gpu_session.sh
#
# Everything is written under $OUT (default /tmp/hooklens-gpu): setup.log, tests.log, kernels.log, tune.log,
# bench.log, exact.log, summary.txt and results.tar.gz (the rows run.py / circuits_exact.py appended to
# results.jsonl, and tune-attention.json). The machine has no network: Python packages missing from its image
# (TransformerLens 3.9 and the parts of its dependency tree the image lacks) travel as wheels in .whl/ (see
# docs/perf-log/NOTES.md for the download command) and are installed with --no-index into /tmp/site. Each phase's
# own limit is overridable (TESTS_LIMIT, KERNELS_LIMIT, TUNE_LIMIT, EXACT_LIMIT, BENCH_LIMIT for every benchmark
# group); a benchmark group cut by its limit loses its rows (run.py appends them at the end) but not its log lines.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/hooklens-gpu}
RES=/tmp/hooklens-gpu-results  # tarred into $OUT/results.tar.gz (the device tool returns at most 8 files)
rm -rf "$RES"; mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 HOOKLENS_COMMIT=${HOOKLENS_COMMIT:-unknown}
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
DEVICE=cuda
[ "$DRY_RUN" = 1 ] && DEVICE=cpu
SESSION_LIMIT=${SESSION_LIMIT:-400}
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(t_sweeps exact t_ov t_attn t_bf16 cpp_errors kernels tests tune attention core
                                   circuits sweeps bf16)
stamp() { date -u +%H:%M:%S; }
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
limit() {  # $1: the phase's own limit -> the smaller of it and the session time left (DRY_RUN: at most 40 s each)
  local left=$((SESSION_LIMIT - (SECONDS - PHASES_START))) own=$1
  [ "$DRY_RUN" = 1 ] && own=$(( own < 40 ? own : 40 ))
  echo $(( own < left ? own : left ))
}
check_workloads() {  # every benchmark group's names exist (a typo would cost a device call)
  local known unknown="" name
  known=$($PY benchmarks/run.py --list 2>/dev/null | awk '{print $1}')
  for name in $(printf '%s\n' "${GROUP[@]}" | tr ',' '\n' | sort -u); do
    grep -qx "$name" <<<"$known" || unknown="$unknown $name"
  done
  summary "[$(stamp)] workload names: ${unknown:-all known}"
}

run_setup() {
  if [ "$DRY_RUN" = 1 ]; then
    summary "[$(stamp)] setup skipped (DRY_RUN: CPU, $($PY -c 'import torch; print("torch", torch.__version__)'))"
    return
  fi
  {
    echo "== $(date -u) commit $HOOKLENS_COMMIT"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
    if compgen -G ".whl/*.whl" >/dev/null; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    rm -rf build hooklens/_C*.so
    time MAX_JOBS=8 $PY -m pip install -q --no-build-isolation --no-deps -e .
    $PY - <<'EOF'
import torch, triton, transformers
import hooklens, hooklens.ops
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "transformers", transformers.__version__, "device", torch.cuda.get_device_name())
print("hooklens C++ extension loaded:", hooklens.ops.extension_available())
try:
    import transformer_lens
    print("transformer_lens", transformer_lens.__version__ if hasattr(transformer_lens, "__version__") else "ok")
except Exception as e:  # the benchmarks' TL references and the parity tests need it
    print("transformer_lens import FAILED:", type(e).__name__, e)
EOF
  } >"$OUT/setup.log" 2>&1
  local rc=$?
  summary "[$(stamp)] setup rc=$rc: $(grep -E '^torch |extension loaded|transformer_lens' "$OUT/setup.log" | tr '\n' ' ')"
}

run_tests() {
  # The whole suite with CUDA visible: the kernel / attention-backend / head-score tests run on the GPU, the rest
  # on the CPU as in CI (tests/conftest.py pins the default device). 15 workers with one thread each; -v so that
  # the per-test lines survive a cut: the summary counts them.
  local parallel=""  # pytest-xdist and pytest-timeout when the image (or .whl) has them
  $PY -c "import xdist, pytest_timeout" 2>/dev/null && parallel="-n 15 --timeout 240"
  OMP_NUM_THREADS=1 timeout $(limit ${TESTS_LIMIT:-200}) $PY -m pytest -v $parallel --tb=short -p no:cacheprovider \
    >"$OUT/tests.log" 2>&1
  local rc=$?
  summary "[$(stamp)] tests rc=$rc: $(grep -c ' PASSED ' "$OUT/tests.log") passed, $(grep -c ' FAILED ' "$OUT/tests.log") \
failed, $(grep -c ' SKIPPED ' "$OUT/tests.log") skipped; $(tail -1 "$OUT/tests.log")"
  grep ' FAILED ' "$OUT/tests.log" | sed 's/.* FAILED //' | sort -u | head -40 | tee -a "$OUT/summary.txt"
}

run_cpp_errors() {  # the device-build crash of the C++ operators' error paths (docs/perf-log/NOTES.md)
  timeout $(limit 150) $PY docs/perf-log/check_cpp_errors.py >"$OUT/cpp_errors.log" 2>&1
  local rc=$?
  summary "[$(stamp)] cpp_errors rc=$rc (1: some bad-input call crashed the interpreter; see cpp_errors.log)"
}

run_tune() {  # block / warp / stage sweep of the Triton kernels (benchmarks/tune_attention.py)
  timeout $(limit ${TUNE_LIMIT:-240}) $PY benchmarks/tune_attention.py --dtypes "${TUNE_DTYPES:-float32,bfloat16}" \
    --out "$RES/tune" >"$OUT/tune.log" 2>&1
  local rc=$?
  summary "[$(stamp)] tune rc=$rc (124: cut by its time limit)"
}

run_kernels() {
  # The GPU-only tests once more, serially and verbose (their names and times), and the large-T shapes.
  timeout $(limit ${KERNELS_LIMIT:-180}) $PY -m pytest -q --durations=15 -p no:cacheprovider \
    tests/test_kernels.py tests/test_attention_backend.py tests/test_head_scores.py \
    tests/test_sweep_engine.py tests/test_ops_patching.py tests/test_sweep_precision.py tests/test_circuits_exact.py \
    >"$OUT/kernels.log" 2>&1
  local rc=$?  # saved first: $(stamp) below would reset $?
  summary "[$(stamp)] kernel tests rc=$rc: $(tail -1 "$OUT/kernels.log")"
}

# Benchmark groups: one run.py call each (each writes its own result files, so a group cut short by its time
# limit loses only itself). GPT-2 small shape, batch 8 x 1024 (the CUDA defaults) unless the workload fixes its own.
declare -A GROUP=(
  [t_sweeps]="ioi_resid_pre_sweep,head_out_all_pos_sweep"
  [t_attn]="pattern_attention_kernel,forward,run_with_cache_vs_forward"
  [t_bf16]="pattern_attention_kernel,forward,run_with_cache_vs_forward"
  [t_ov]="ov_eigenvalues"
  [core]="forward,run_with_cache_all,run_with_cache_patterns,patching_loop"
  [attention]="pattern_attention_kernel,flash_attention_kernel,run_with_cache_vs_forward,induction_scores,induction_scores_streamed"
  [circuits]="ov_eigenvalues,full_ov_eigenvalues,ov_svd,composition_scores,kcomp_top1"
  [sweeps]="ioi_resid_pre_sweep,head_out_all_pos_sweep,head_out_by_pos_sweep,mlp_out_sweep,index_patch_resid_pre,index_patch_head_out"
  [bf16]="forward,pattern_attention_kernel,flash_attention_kernel,run_with_cache_vs_forward"
)
declare -A GROUP_LIMIT=([t_sweeps]=150 [t_attn]=90 [t_bf16]=60 [t_ov]=60 [core]=120 [attention]=120 [bf16]=60
                        [sweeps]=220 [circuits]=150)
run_bench() {  # $1: group name
  local dtype=float32
  case "$1" in bf16|t_bf16) dtype=bfloat16 ;; esac
  timeout $(limit ${BENCH_LIMIT:-${GROUP_LIMIT[$1]}}) $PY benchmarks/run.py --device $DEVICE --dtype $dtype \
    --workloads "${GROUP[$1]}" --log "$RES/results.jsonl" >>"$OUT/bench.log" 2>&1
  local rc=$?
  summary "[$(stamp)] bench $1 ($dtype) rc=$rc (124: cut by its time limit; run.py appends its rows only at the end)"
}

run_exact() {  # circuit_exact_all_edges: exact over all 32,491 GPT-2-small edges, 100 IOI prompts, 8 GiB chunks
  local shape="--prompts 100 --sample 4 --budget 8589934592"
  [ "$DRY_RUN" = 1 ] && shape="--layers 1 --prompts 4 --sample 2 --threads 1"
  timeout $(limit ${EXACT_LIMIT:-300}) $PY benchmarks/circuits_exact.py --all-edges --device $DEVICE $shape \
    --log "$RES/results.jsonl" >"$OUT/exact.log" 2>&1
  local rc=$?
  summary "[$(stamp)] exact rc=$rc: $(tail -1 "$OUT/exact.log" | cut -c1-400)"
}

run_setup
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
check_workloads
PHASES_START=$SECONDS
for phase in "${phases[@]}"; do
  if [ $((SESSION_LIMIT - (SECONDS - PHASES_START))) -lt 30 ]; then
    summary "[$(stamp)] $phase skipped: SESSION_LIMIT ($SESSION_LIMIT s) reached"
    continue
  fi
  case "$phase" in
    setup) ;;
    tests) run_tests ;;
    kernels) run_kernels ;;
    tune) run_tune ;;
    cpp_errors) run_cpp_errors ;;
    exact) run_exact ;;
    t_sweeps|t_attn|t_bf16|t_ov|core|attention|circuits|sweeps|bf16) run_bench "$phase" ;;
    *) summary "unknown phase $phase" ;;
  esac
  tar czf "$OUT/results.tar.gz" -C "$RES" .  # after every phase: what finished comes back even if a later one is cut
done
grep "^|" "$OUT/bench.log" || true
cat "$OUT/summary.txt"
