#!/usr/bin/env bash
# Measure benchmarks/speed.py on a GPU machine that has no network, in one prepared call.
#
#   scripts/device_speed.sh prepare   # here, with the package index reachable: fills .device/ (git-ignored)
#   scripts/device_speed.sh run       # on the GPU machine, from the repository root, .device/ carried along
#
# For a GPU machine that reaches no package index and has no copy of the data, used for a few minutes at a time.
# `prepare` gathers what that machine lacks: learn2learn's sdist and the build/runtime pieces
# scripts/install_learn2learn.sh fetches (gym, gym_notices, Cython for CPython 3.12, the GPU image's Python), and the
# two Omniglot archives of the Vinyals split for the end-to-end run (18 MB in all; from $OMNIGLOT, by default
# $LIT_META_DATA/omniglot or data/omniglot). `run` installs learn2learn offline through the same install script (pip
# reads .device/wheels only: PIP_NO_INDEX / PIP_FIND_LINKS), then runs the compute-only and the end-to-end comparisons
# on the GPU and writes their output to $OUT (or .device/out).
#
# The target Python needs torch, torchvision, lightning, torchmetrics, pillow, scipy, requests, tqdm and setuptools (the
# GPU image has them all). Rehearsed on CPU in a fresh venv holding just those: learn2learn built offline from
# .device/wheels in ~1 min, both --quick runs printed every row. Ran on an H100 (torch 2.11) on 2026-11-26: 390 s in
# all, learn2learn built in 55 s; output in benchmarks/results/h100-2026-11-26/.
#
# After the two speed runs, `run` also runs the tests that need a GPU, benchmarks/precision.py (MAML on Omniglot at
# each precision, PRECISION_STEPS steps) and benchmarks/estimate.py (the hours of every config that has no recorded
# result, measured on synthetic images of its dataset's shape, written into benchmarks/reproduction.yaml, which comes
# back in $OUT; it needs the command line's jsonargparse, whose wheels `prepare` fetches). Every step has a time
# limit inside DEVICE_BUDGET_S, most important first; PARTS chooses the parts.
#
# Knobs: PYTHON (default python3), DEVICE (default cuda; `DEVICE=cpu scripts/device_speed.sh run --quick` rehearses
# the whole path on a CPU machine), DEVICE_BUDGET_S, PARTS (default "speed tests precision estimates"), PRECISIONS,
# PRECISION_STEPS, ESTIMATE_CONFIGS (default: `benchmarks/estimate.py --unrun`), OMNIGLOT; extra
# arguments of `run` go to both speed.py runs (e.g. --quick).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAGE="$HERE/.device"
PYTHON="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
DEVICE_BUDGET_S="${DEVICE_BUDGET_S:-520}"       # wall seconds `run` may take in all (the machine's limit, less margin)
PRECISIONS="${PRECISIONS:-32-true bf16-mixed 16-mixed}"
PRECISION_STEPS="${PRECISION_STEPS:-1500}"
OMNIGLOT="${OMNIGLOT:-${LIT_META_DATA:-$HERE/data}/omniglot}"
PARTS="${PARTS:-speed tests precision estimates}"

die() { printf 'device_speed: %s\n' "$*" >&2; exit 1; }

prepare() {
    mkdir -p "$STAGE/wheels" "$STAGE/omniglot"
    local pip=("$PYTHON" -m pip download --no-deps -d "$STAGE/wheels")
    # Source distributions, as the install script builds them (metadata only, no Cython needed for that).
    "${pip[@]}" --no-build-isolation --no-binary learn2learn "learn2learn==0.2.0"
    # gym is pure Python but ships only an sdist, whose isolated build would need setuptools from an index there.
    "$PYTHON" -m pip wheel --no-deps -w "$STAGE/wheels" "gym==0.26.2"
    # Wheels for the GPU image's interpreter (CPython 3.12, x86-64 Linux).
    local target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any)
    "${pip[@]}" "${target[@]}" "gym_notices>=0.0.4" "cloudpickle>=1.2.0"  # gym's needs (the GPU image has cloudpickle)
    "${pip[@]}" "${target[@]}" "cython>=3.0.10,<4"
    # And Cython's pure-Python wheel, for a rehearsal on any other interpreter (slower, same C files).
    "${pip[@]}" --only-binary=:all: --implementation py --platform any "cython>=3.0.10,<4"
    # The command line's parser, for benchmarks/estimate.py (pure Python; the image has PyYAML and typing-extensions).
    "${pip[@]}" "${target[@]}" "jsonargparse==4.53.0" "docstring_parser==0.18.0" "typeshed_client==2.15.0"
    for archive in images_background.zip images_evaluation.zip; do
        [[ -f "$OMNIGLOT/$archive" ]] || die "missing $OMNIGLOT/$archive (set OMNIGLOT to the folder holding it)"
        cp "$OMNIGLOT/$archive" "$STAGE/omniglot/"
    done
    du -sh "$STAGE"
    echo "prepared: carry .device in the device call, and run: scripts/device_speed.sh run"
}

part() { [[ " $PARTS " == *" $1 "* ]]; }

# Run "$@" under a time limit of $1 seconds, capped by what is left of DEVICE_BUDGET_S; a step that fails or runs out
# of time is reported and the next one still runs (what each printed is already in the log).
step() {
    local limit=$1; shift
    local left=$((DEVICE_BUDGET_S - SECONDS))
    (( left < limit )) && limit=$left
    if (( limit < 20 )); then echo "== skipped (${left}s of the budget left): $*"; return 0; fi
    timeout --kill-after=5 "$limit" "$@" || echo "== failed or out of time (status $?, limit ${limit}s): $*"
}

run() {
    [[ -d "$STAGE/wheels" ]] || die "no $STAGE/wheels: run 'scripts/device_speed.sh prepare' first (where pip reaches the index) and carry .device"
    local out="${OUT:-$STAGE/out}"
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1 WANDB_MODE=disabled LIT_META_CACHE="${LIT_META_CACHE:-/tmp/lit_meta_cache}"
    local omniglot="$STAGE/omniglot"
    {
        echo "== $(date -u +%FT%TZ) $(uname -m); $("$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())')"
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
        if part speed; then
            PIP_NO_INDEX=1 PIP_FIND_LINKS="$STAGE/wheels" PYTHON="$PYTHON" bash "$HERE/scripts/install_learn2learn.sh"
            echo "== compute only (and the float64 meta-gradient check against learn2learn on the device)"
            step 200 "$PYTHON" "$HERE/benchmarks/speed.py" --device "$DEVICE" --native-bn --check --steps 3 --repeats 5 \
                --json "$out/speed.json" "$@"
            echo "== end to end"
            step 200 "$PYTHON" "$HERE/benchmarks/speed.py" --device "$DEVICE" --steps 3 --repeats 5 --end-to-end \
                --root "$omniglot" --json "$out/speed_end_to_end.json" "$@"
        fi
        if part tests; then
            echo "== tests that need a GPU"
            step 60 "$PYTHON" -m pytest -q -p no:cacheprovider "$HERE/tests/test_data_store.py" -k gpu
        fi
        if part precision; then
            # Mixed precision on real Omniglot, one precision per process so each prints as it finishes.
            for precision in $PRECISIONS; do
                echo "== precision $precision"
                step 120 "$PYTHON" "$HERE/benchmarks/precision.py" --root "$omniglot" --precisions "$precision" \
                    --steps "$PRECISION_STEPS" --test-episodes 600 --eval-meta-batch-size 100
            done
        fi
        if part estimates; then
            echo "== estimates of the configs' full schedules"
            local site=/tmp/lit_meta_site
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
                "$STAGE"/wheels/{jsonargparse,docstring_parser,typeshed_client}-*.whl
            local configs=(${ESTIMATE_CONFIGS:-$("$PYTHON" "$HERE/benchmarks/estimate.py" --unrun)})
            # Each row is recorded as it is measured, so what the time limit leaves is kept.
            step 600 env PYTHONPATH="$site" "$PYTHON" "$HERE/benchmarks/estimate.py" "${configs[@]/#/$HERE/configs/}" \
                --synthetic --device "$DEVICE" --record
            cp "$HERE/benchmarks/reproduction.yaml" "$out/"
        fi
        echo "== done after ${SECONDS}s"
    } 2>&1 | tee "$out/device_speed.log"
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    *) die "usage: scripts/device_speed.sh prepare | run [speed.py arguments]" ;;
esac
