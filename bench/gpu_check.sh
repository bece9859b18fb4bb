#!/usr/bin/env bash
# The GPU check of issue 4, in one go: environment, the benchmark (ours vs the reference) as a run is
# configured, the full paper run at a constant rate of 0.2 under CUDA graphs, and two more benchmark
# variants. Run it from the repository root:
#
#     OUT=/some/folder DYNDROP_DATA_DIR=$PWD/.data bash bench/gpu_check.sh
#
# It writes at most 8 files, flat, into $OUT: env.txt (nvidia-smi, torch, modules, each step's exit status),
# bench_<preset>.json (defaults, with the sampling check and an eval-merge sweep), bench_<preset>_<MODE>.json
# and bench_<preset>_<MODE>_fused.json (compile mode MODE, written-out vs fused attention dropout),
# bench_<preset>.log (all benchmark runs, with torch's perf hints, e.g. why CUDA graphs were skipped),
# train_<preset>_const02.log and <preset>_const02_{summary.json,metrics.jsonl}.
# The run's checkpoints stay in $SCRATCH (default: a temp folder), not in $OUT.
#
# Knobs (environment): PRESET (paper), BUDGET_S (whole script, default 480), BENCH_ARGS, TRAIN_ARGS (extra
# arguments), MODE (the torch.compile mode of the full run and the variants, default reduce-overhead),
# ROWS (controllers trained beside the constant-0.2 run, see step 2), TRAIN_CAP (seconds per run, 200),
# PYTHON (python3), SCRATCH. A failing or hanging step is cut off by `timeout` and the next one still runs.
# The CPU test of this script: PRESET=tiny with small BENCH_ARGS/TRAIN_ARGS (see the README).
set -u -o pipefail  # no -e: one failing step must not stop the later ones
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export DYNDROP_DATA_DIR="${DYNDROP_DATA_DIR:-$PWD/.data}"
OUT="${OUT:?set OUT to the folder for results}"
PY="${PYTHON:-python3}"
PRESET="${PRESET:-paper}"
BUDGET_S="${BUDGET_S:-480}"
BENCH_ARGS="${BENCH_ARGS:---iters 500 --ref-iters 250 --eval-passes 3 --ref-eval-passes 1}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
MODE="${MODE:-reduce-overhead}"
ROWS="${ROWS:-}"
TRAIN_CAP="${TRAIN_CAP:-200}"
SCRATCH="${SCRATCH:-$(mktemp -d)}"
RUN="${PRESET}_const02"
START=$(date +%s)
mkdir -p "$OUT" "$SCRATCH"
ENV_TXT="$OUT/env.txt"
STEPS="$SCRATCH/steps.txt"  # each step's exit status, appended to env.txt at the end
: > "$STEPS"

# seconds a step may take: its cap, or what is left of the budget (less 15 s for the copying at the end)
limit() { local left=$(( BUDGET_S - ($(date +%s) - START) - 15 )); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
# run a step under `timeout`, record its exit status (124 = timed out)
step() { local name=$1 cap=$2; shift 2; local t; t=$(limit "$cap")
         echo "=== $name (limit ${t}s, $(( $(date +%s) - START ))s into the check)"
         timeout -k 10 "$t" "$@"; local rc=$?
         echo "step $name: exit $rc after $(( $(date +%s) - START ))s (limit ${t}s)" >> "$STEPS"; return 0; }

exec 9>&2; BASH_XTRACEFD=9  # the trace goes to the console, never into the result files
set -x
{ date -u; hostname; nvidia-smi || echo "nvidia-smi failed"; echo "python: $PY"; "$PY" --version
  command -v gcc cc || echo "no C compiler on PATH (triton needs one to build its launcher)"
  ls -l "$DYNDROP_DATA_DIR/shakespeare_char/input.txt" || echo "DATA MISSING: $DYNDROP_DATA_DIR/shakespeare_char/input.txt"
} > "$ENV_TXT" 2>&1
cat "$ENV_TXT"

# Which modules exist here. scipy (controllers/pid.py imports it at the top) and tqdm (gpt/data.py) are
# needed only to import; if missing, stand-ins are put on PYTHONPATH and said so in env.txt.
SHIMS="$SCRATCH/shims"
"$PY" - "$SHIMS" >> "$ENV_TXT" 2>&1 <<'PYEOF'
import importlib.util, os, sys
shims = sys.argv[1]
def present(name):
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:
        return False
for name in ("torch", "numpy", "scipy", "tqdm", "wandb", "gymnasium", "stable_baselines3"):
    print(f"module {name}: {'present' if present(name) else 'ABSENT'}")
if not present("scipy"):
    os.makedirs(f"{shims}/scipy", exist_ok=True)
    open(f"{shims}/scipy/__init__.py", "w").write("")
    open(f"{shims}/scipy/signal.py", "w").write(
        "def lfilter(*args, **kwargs):\n    raise ImportError('scipy is not installed (gpu_check stand-in)')\n")
    print("SHIM: scipy.signal stand-in (the pid controller cannot run; nothing here uses it)")
if not present("tqdm"):
    os.makedirs(f"{shims}/tqdm", exist_ok=True)
    stub = ("class tqdm:\n    def __init__(self, *a, **k): pass\n    def update(self, *a, **k): pass\n"
            "    def set_postfix(self, *a, **k): pass\n    def close(self): pass\n"
            "    def __enter__(self): return self\n    def __exit__(self, *a): pass\n")
    open(f"{shims}/tqdm/__init__.py", "w").write(stub)
    open(f"{shims}/tqdm/auto.py", "w").write("from . import tqdm\n")
    print("SHIM: tqdm stand-in (no progress bars)")
PYEOF
[ -d "$SHIMS" ] && export PYTHONPATH="$SHIMS${PYTHONPATH:+:$PYTHONPATH}"

# torch, the GPU, and whether torch.compile works here (else both steps run eagerly, and env.txt says so)
COMPILE_FLAG=""
step torch-and-compile 120 "$PY" -c "
import torch, time
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))
    t = time.perf_counter()
    f = torch.compile(lambda x: torch.sin(x) * 2)
    print('compile smoke test', f(torch.ones(8, device='cuda')).sum().item(), f'{time.perf_counter() - t:.1f}s')
" 2>&1 | tee -a "$ENV_TXT"
if ! grep -q "^step torch-and-compile: exit 0 " "$STEPS"; then
  COMPILE_FLAG="--no-compile"; echo "torch.compile failed: running both steps with --no-compile" | tee -a "$ENV_TXT"
fi

# 1. the benchmark as a run is configured: ours vs the plain reference, one process; sampling with and
# without the KV cache (compiled decode step); evaluation at 1 and 10 batches per pass besides the default;
# a profile of 50 iterations (top kernels, and how busy the GPU was)
step bench 200 env TORCH_LOGS=perf_hints "$PY" -m runs.bench --preset "$PRESET" --json "$OUT/bench_$PRESET.json" \
  --eval-merge-sweep 1,10 --profile-iters 50 $BENCH_ARGS $COMPILE_FLAG 2>&1 | tee "$OUT/bench_$PRESET.log"

# 2. the full run of the protocol under compile mode MODE, checkpoints on as in any run (nanoGPT's
# train.py: best val ~1.47 in ~174 s on an H100); does it converge as the default mode did (1.4714)?
# Each controller in ROWS (e.g. "pid val_loss") is trained at the same time on the same GPU, same seed, so the
# losses compare but the times are shared-GPU times; each adds train_<preset>_<row>.log, <preset>_<row>_*.
MODE_FLAG="--compile-mode $MODE"; [ -n "$COMPILE_FLAG" ] && MODE_FLAG="$COMPILE_FLAG"
train_row() { local ctl=$1 name=$2
  step "train-$name" "$TRAIN_CAP" "$PY" -m runs.train --controller "$ctl" --preset "$PRESET" --wandb disabled --no-progress \
    --out "$SCRATCH/$name" --overwrite $MODE_FLAG $TRAIN_ARGS > "$OUT/train_$name.log" 2>&1
  for f in summary.json metrics.jsonl; do
    cp "$SCRATCH/$name/$f" "$OUT/${name}_$f" || echo "no $f from the run $name" >> "$STEPS"
  done; }
for ROW in $ROWS; do train_row "$ROW" "${PRESET}_${ROW//[^A-Za-z0-9]/_}" & done
train_row constant:rate=0.2 "$RUN"; wait
tail -n 5 "$OUT"/train_*.log

# 3. ours under MODE with written-out, then fused attention dropout (the reference kept short, no
# sampling), each only if 60 s of the budget are left
if [ -z "$COMPILE_FLAG" ]; then
  for ATT in manual fused; do
    (( BUDGET_S - ($(date +%s) - START) > 60 )) || break
    NAME="bench_${PRESET}_$MODE"; [ "$ATT" = fused ] && NAME="${NAME}_fused"
    step "bench-$MODE-$ATT" 150 env TORCH_LOGS=perf_hints "$PY" -m runs.bench --preset "$PRESET" --compile-mode "$MODE" \
      --attention-dropout "$ATT" --json "$OUT/$NAME.json" $BENCH_ARGS --ref-iters 50 --ref-eval-passes 1 \
      --no-sampling --profile-iters 50 2>&1 | tee -a "$OUT/bench_$PRESET.log"
  done
fi

set +x
cat "$STEPS" >> "$ENV_TXT"
echo "=== done in $(( $(date +%s) - START ))s; results in $OUT:"; ls -la "$OUT"
cat "$STEPS"
"$PY" -c "
import json, sys
keys = ('best_val_loss', 'best_val_loss_full', 'best_val_iter', 'total_train_time_s', 'train_loop_time_s',
        'eval_time_s', 'train_tokens_per_s', 'recompiles', 'device_name', 'torch')
for path in sys.argv[1:]:
    s = json.load(open(path))
    print(path.rsplit('/', 1)[-1], {k: s.get(k) for k in keys})" "$OUT"/*_summary.json
exit 0
