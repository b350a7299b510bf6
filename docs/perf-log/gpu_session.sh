#!/usr/bin/env bash
# One GPU session on a bare CUDA machine (issue 7): install hooklens against the machine's own torch/triton,
# build the C++ extension, run the test suite with CUDA visible, then the benchmark harness.
#
#   HOOKLENS_COMMIT=$(git rev-parse --short HEAD) OUT=/some/dir bash docs/perf-log/gpu_session.sh [PHASE ...]
#
# PHASE is any of: setup, tests, kernels, cpp_errors (check_cpp_errors.py), tune (tune_attention.py), and the
# benchmark groups attention, bf16, core, sweeps, circuits (below); default: all of them in that order.
# `setup` (install + C++ build, ~65 s on an H100 machine) always runs first. Phase times seen on an H100 (2026-11-22): kernels 120 s, tests 82 s (-n 15), tune
# (bf16 only) ~60 s, attention 63 s, bf16 24 s, core 75 s; sweeps needs ~200 s (TL's 2160 forwards in
# head_out_by_pos), circuits ~120 s. A device call runs at most 10 minutes, so a session is two calls:
#   bash docs/perf-log/gpu_session.sh kernels cpp_errors tests tune   # ~8 min
#   bash docs/perf-log/gpu_session.sh attention bf16 core sweeps circuits   # ~9.5 min
# Everything is written under $OUT (default /tmp/hooklens-gpu): setup.log, tests.log, kernels.log, tune.log,
# bench.log, summary.txt and results.tar.gz (the rows run.py appended to results.jsonl, and tune-attention.json).
# The machine has no network: Python packages missing from its image (TransformerLens 3.9 and the parts of its
# dependency tree the image lacks) travel as wheels in .whl/ (see docs/perf-log/NOTES.md for the download command)
# and are installed with --no-index into /tmp/site. Each phase runs under `timeout` (limits below, each
# overridable: TESTS_LIMIT, KERNELS_LIMIT, TUNE_LIMIT, BENCH_LIMIT for every benchmark group) so one hang cannot eat
# the lease; a benchmark group cut by its limit loses its rows (run.py appends them at the end) but not
# its log lines in bench.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/hooklens-gpu}
RES=/tmp/hooklens-gpu-results  # tarred into $OUT/results.tar.gz (the device tool returns at most 8 files)
rm -rf "$RES"; mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 HOOKLENS_COMMIT=${HOOKLENS_COMMIT:-unknown}
PY=${PYTHON:-python3}
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(kernels cpp_errors tests tune attention bf16 core sweeps circuits)
stamp() { date -u +%H:%M:%S; }
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

run_setup() {
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
  OMP_NUM_THREADS=1 timeout ${TESTS_LIMIT:-200} $PY -m pytest -v -n 15 --tb=short --timeout 240 -p no:cacheprovider \
    >"$OUT/tests.log" 2>&1
  local rc=$?
  summary "[$(stamp)] tests rc=$rc: $(grep -c ' PASSED ' "$OUT/tests.log") passed, $(grep -c ' FAILED ' "$OUT/tests.log") \
failed, $(grep -c ' SKIPPED ' "$OUT/tests.log") skipped; $(tail -1 "$OUT/tests.log")"
  grep ' FAILED ' "$OUT/tests.log" | sed 's/.* FAILED //' | sort -u | head -40 | tee -a "$OUT/summary.txt"
}

run_cpp_errors() {  # the device-build crash of the C++ operators' error paths (docs/perf-log/NOTES.md)
  timeout 150 $PY docs/perf-log/check_cpp_errors.py >"$OUT/cpp_errors.log" 2>&1
  local rc=$?
  summary "[$(stamp)] cpp_errors rc=$rc (1: some bad-input call crashed the interpreter; see cpp_errors.log)"
}

run_tune() {  # block / warp / stage sweep of the Triton kernels (benchmarks/tune_attention.py)
  timeout ${TUNE_LIMIT:-240} $PY benchmarks/tune_attention.py --dtypes "${TUNE_DTYPES:-float32,bfloat16}" \
    --out "$RES/tune" >"$OUT/tune.log" 2>&1
  local rc=$?
  summary "[$(stamp)] tune rc=$rc (124: cut by its time limit)"
}

run_kernels() {
  # The GPU-only tests once more, serially and verbose (their names and times), and the large-T shapes.
  timeout ${KERNELS_LIMIT:-180} $PY -m pytest -q --durations=15 -p no:cacheprovider \
    tests/test_kernels.py tests/test_attention_backend.py tests/test_head_scores.py \
    tests/test_sweep_engine.py tests/test_ops_patching.py tests/test_sweep_precision.py >"$OUT/kernels.log" 2>&1
  local rc=$?  # saved first: $(stamp) below would reset $?
  summary "[$(stamp)] kernel tests rc=$rc: $(tail -1 "$OUT/kernels.log")"
}

# Benchmark groups: one run.py call each (each writes its own result files, so a group cut short by its time
# limit loses only itself). GPT-2 small shape, batch 8 x 1024 (the CUDA defaults) unless the workload fixes its own.
declare -A GROUP=(
  [core]="forward,run_with_cache_all,run_with_cache_patterns,patching_loop"
  [attention]="pattern_attention_kernel,flash_attention_kernel,run_with_cache_vs_forward,induction_scores,induction_scores_streamed"
  [circuits]="ov_eigenvalues,full_ov_eigenvalues,ov_svd,composition_scores,kcomp_top1"
  [sweeps]="ioi_resid_pre_sweep,head_out_all_pos_sweep,head_out_by_pos_sweep,mlp_out_sweep,index_patch_resid_pre,index_patch_head_out"
  [bf16]="forward,pattern_attention_kernel,flash_attention_kernel,run_with_cache_vs_forward"
)
declare -A GROUP_LIMIT=([core]=120 [attention]=120 [bf16]=60 [sweeps]=220 [circuits]=150)
run_bench() {  # $1: group name
  local dtype=float32
  [ "$1" = bf16 ] && dtype=bfloat16
  timeout ${BENCH_LIMIT:-${GROUP_LIMIT[$1]}} $PY benchmarks/run.py --device cuda --dtype $dtype --workloads "${GROUP[$1]}" \
    --log "$RES/results.jsonl" >>"$OUT/bench.log" 2>&1
  local rc=$?
  summary "[$(stamp)] bench $1 ($dtype) rc=$rc (124: cut by its time limit; run.py appends its rows only at the end)"
}

run_setup
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
for phase in "${phases[@]}"; do
  case "$phase" in
    setup) ;;
    tests) run_tests ;;
    kernels) run_kernels ;;
    tune) run_tune ;;
    cpp_errors) run_cpp_errors ;;
    core|attention|circuits|sweeps|bf16) run_bench "$phase" ;;
    *) summary "unknown phase $phase" ;;
  esac
  tar czf "$OUT/results.tar.gz" -C "$RES" .  # after every phase: what finished comes back even if a later one is cut
done
grep "^|" "$OUT/bench.log" || true
cat "$OUT/summary.txt"
