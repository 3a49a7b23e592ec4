#!/usr/bin/env bash
# Everything the GPU numbers in docs/ come from, in stages that each fit a 10-minute command:
#   bash benchmarks/gpu_session.sh check       build the CUDA extension, run the test suite, smoke runs
#   bash benchmarks/gpu_session.sh ops         op and end-to-end step benchmarks (pytest-benchmark JSON)
#   bash benchmarks/gpu_session.sh profile     where the cifar10 step's time goes: its parts, top kernels,
#                                              device busy fraction, synchronising calls, a Chrome trace
#                                              of one step; channels_last and cuDNN autotuning against
#                                              the preset
#   bash benchmarks/gpu_session.sh cifar10     data-free pre-dfkd, ResNet-56 -> ResNet-20
#   bash benchmarks/gpu_session.sh unlabeled   unlabeled collection, uniform vs related sampling
# Several stages may be given at once. BENCH_OPS picks the op suites (kd_div alone took 3.5 minutes
# on an H100, torch.compile included). TRAIN_SECONDS (default 420) bounds each training stage: a
# short probe run measures steps per second and the real run gets as many steps as fit, with its
# cosine schedule over exactly those steps. Logs and results are collected in $OUT (default
# runs/gpu-session/) as session.log and results.tar.gz. The training stages read the shared data
# through DFKD_FAST_SHARED; benchmarks/make_gpu_carry.sh builds the slice of it that can travel.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-runs/gpu-session}"
mkdir -p "$out"
export PATH="$(dirname "$(python3 -c 'import sys; print(sys.executable)')"):$PATH"
train_seconds="${TRAIN_SECONDS:-420}"
# a run that overruns gets SIGTERM: it finishes its step, checkpoints it and exits (--resume goes on)
overrun_seconds=$((train_seconds + 90))
collected=()

log() { echo "=== $(date +%T) $*" | tee -a "$out/session.log"; }

ensure_built() {
    if python3 -c "import torch, dfkd_fast; from dfkd_fast._extension import extension_loaded; \
assert extension_loaded() and hasattr(torch.ops.dfkd_fast, 'reparameterize')" 2>/dev/null \
        && command -v dfkd-fast >/dev/null; then
        return 0
    fi
    log "building (DFKD_FAST_CUDA=1)"
    local start=$SECONDS
    DFKD_FAST_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1
    local status=$?
    tail -5 "$out/build.log" | tee -a "$out/session.log"
    log "build exit $status in $((SECONDS - start)) s"
    python3 -c "import dfkd_fast; print(dfkd_fast.extension_status())" 2>&1 | tee -a "$out/session.log"
    return $status
}

slug() {
    python3 -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))"
}

# steps_within SECONDS RUN_DIR: steps that fit SECONDS at the rate the probe run measured between
# its first and last evaluation (compilation and warm-up excluded), a multiple of 100.
steps_within() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
seconds, run = float(sys.argv[1]), sys.argv[2]
curve = json.load(open(f"{run}/metrics.json"))["curve"]
first, last = curve[0], curve[-1]
rate = (last["step"] - first["step"]) / (last["seconds"] - first["seconds"])
print(max(100, int(seconds * rate) // 100 * 100))
EOF
}

stage_check() {
    log "machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$out/session.log"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
        | tee -a "$out/session.log"
    ensure_built || return 1
    log "test suite"
    # the shared data sets do not travel to the GPU machine: their tests skip, the CPU CI runs them
    # SIGINT at the time limit: pytest still prints its summary and the tracebacks
    DFKD_FAST_SHARED=/nonexistent timeout -s INT "${TEST_SECONDS:-300}" python3 -m pytest -v -n 8 \
        --tb=short -rfE -p no:cacheprovider tests >"$out/tests.log" 2>&1
    log "tests exit $?"
    grep -E "^=+ .*(passed|failed|error)" "$out/tests.log" | tail -2 | tee -a "$out/session.log"
    grep -E "^(FAILED|ERROR) " "$out/tests.log" | head -60 | tee -a "$out/session.log"
    collected+=("$out/tests.log")
}

stage_ops() {
    ensure_built || return 1
    log "op benchmarks"
    timeout "${BENCH_SECONDS:-420}" python3 benchmarks/run_all.py --device cuda \
        --ops ${BENCH_OPS:-distill_step upsample_conv few_channel_conv bn_stats reparameterize kd_div} \
        --benchmark-args=--benchmark-max-time=0.25 >"$out/benchmarks.log" 2>&1
    log "benchmarks exit $?"
    collected+=("$out/benchmarks.log" benchmarks/results/*-"$(slug)".json)
}

stage_profile() {
    ensure_built || return 1
    local tag
    tag="$(slug)"
    log "profile of the cifar10 pre-dfkd step"
    timeout 240 python3 benchmarks/profile_step.py --preset cifar10 --device cuda \
        --json "benchmarks/results/profile-cifar10-$tag.json" >"$out/profile.log" 2>&1
    log "profile exit $?"
    timeout 120 python3 benchmarks/profile_step.py --preset cifar10 --device cuda --cudnn-benchmark \
        --top 5 --json "benchmarks/results/profile-cifar10-cudnn-benchmark-$tag.json" >>"$out/profile.log" 2>&1
    log "profile with cuDNN autotuning exit $?"
    timeout 120 python3 benchmarks/profile_step.py --preset cifar10 --device cuda --steps 1 --top 5 \
        --trace "$out/profile-trace-cifar10.json.gz" >>"$out/profile.log" 2>&1
    log "one step's trace exit $? ($(du -h "$out/profile-trace-cifar10.json.gz" 2>/dev/null | cut -f1))"
    timeout 180 python3 benchmarks/step_configs.py --preset cifar10 --device cuda --field channels_last \
        --values false true --blocks 4 --json "benchmarks/results/step-channels-last-cifar10-$tag.json" \
        >>"$out/profile.log" 2>&1
    log "channels_last exit $?"
    timeout 120 python3 benchmarks/step_upsample_conv.py --preset cifar10 --device cuda --blocks 4 \
        --json "benchmarks/results/step-upsample-conv-cifar10-$tag.json" >>"$out/profile.log" 2>&1
    log "UpsampleConv2d against nn.Upsample + nn.Conv2d exit $?"
    grep -E "ms per step|busy|synchronising|speed-up" "$out/profile.log" | tee -a "$out/session.log"
    collected+=("$out/profile.log" benchmarks/results/profile-cifar10-*"$tag".json
                "benchmarks/results/step-channels-last-cifar10-$tag.json"
                "benchmarks/results/step-upsample-conv-cifar10-$tag.json")
}

stage_cifar10() {
    ensure_built || return 1
    local tag probe steps
    tag="$(slug)"
    probe="runs/probe-cifar10-$tag"
    rm -rf "$probe"
    log "cifar10 probe"
    OUTPUT_DIR="$probe" RESULT_TAG=probe timeout 200 bash benchmarks/distill_cifar10.sh \
        --device cuda --steps 60 --eval-every 20 --quiet >>"$out/session.log" 2>&1 || return 1
    steps="$(steps_within "$train_seconds" "$probe")"
    log "cifar10 data-free pre-dfkd, $steps steps"
    OUTPUT_DIR="runs/cifar10-pre-dfkd-$tag" RESULT_TAG="$tag" timeout "$overrun_seconds" \
        bash benchmarks/distill_cifar10.sh --device cuda --steps "$steps" --quiet 2>&1 | tail -4 | tee -a "$out/session.log"
    collected+=("runs/cifar10-pre-dfkd-$tag" "benchmarks/results/distill-cifar10-$tag.json"
                "docs/img/cifar10-accuracy-$tag.png")
}

stage_unlabeled() {
    ensure_built || return 1
    local tag probe steps
    tag="$(slug)"
    probe="runs/cifar10-unlabeled-uniform-probe"
    rm -rf runs/cifar10-unlabeled-*-probe
    log "unlabeled probe"
    POLICIES=uniform RESULT_TAG=probe timeout 240 bash benchmarks/distill_unlabeled_cifar10.sh \
        --device cuda --steps 150 --eval-every 50 --quiet >>"$out/session.log" 2>&1 || return 1
    # two runs, and the related one rescores the collection as it goes
    steps="$(steps_within "$((train_seconds * 2 / 5))" "$probe")"
    log "unlabeled uniform vs related, $steps steps each"
    RESULT_TAG="$tag" timeout "$overrun_seconds" bash benchmarks/distill_unlabeled_cifar10.sh \
        --device cuda --steps "$steps" --quiet 2>&1 | tail -6 | tee -a "$out/session.log"
    collected+=(runs/cifar10-unlabeled-*-"$tag" "benchmarks/results/distill-unlabeled-cifar10-$tag.json"
                "docs/img/cifar10-unlabeled-accuracy-$tag.png")
}

for stage in "$@"; do
    case "$stage" in
        check | profile | ops | cifar10 | unlabeled) "stage_$stage" || log "stage $stage failed" ;;
        *) echo "unknown stage $stage (check, profile, ops, cifar10, unlabeled)" >&2; exit 2 ;;
    esac
done
existing=()
for path in "${collected[@]}"; do [ -e "$path" ] && existing+=("$path"); done
[ ${#existing[@]} -gt 0 ] && tar czf "$out/results.tar.gz" --exclude=checkpoint.pt "${existing[@]}"
log "done"
