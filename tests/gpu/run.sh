#!/usr/bin/env bash
# Every GPU check in one go, for a machine with a CUDA GPU and PyTorch (DALI is not needed):
# the gpu-marked tests (AMP, channels-last, fp32 and float64 equivalence with the reference, the mini run),
# then the densenet121 training step, ours at its best against torchvision's eager model (batch 256, 224 px,
# bf16, channels-last), and memory_efficient off vs on.
# The last lines printed are the table. BATCH, STEPS, SIZE and PYTHON override the defaults. Packages the
# machine lacks (omegaconf) come as wheels in .whl/, fetched beforehand by tests/gpu/wheels.sh.
# With DALI (installed, or its wheels carried in parts to .whl-dali/ by `DALI=1 tests/gpu/wheels.sh`, one part
# per call on a machine that takes 64 MiB per call), the mini config also trains with DALI's `mixed` decoder.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
BATCH="${BATCH:-256}"
STEPS="${STEPS:-20}"
SIZE="${SIZE:-224}"
OUT="${OUT:-$(mktemp -d)}"

if compgen -G ".whl/*.whl" > /dev/null; then  # carried from tests/gpu/wheels.sh
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -f .whl-dali/SHA256SUMS ]; then  # DALI's wheels, carried in parts (tests/gpu/wheels.sh with DALI=1)
    if (cd .whl-dali && sha256sum --quiet -c SHA256SUMS); then
        mkdir -p /tmp/dali-wheels && cat .whl-dali/dali.tar.part-* | tar -C /tmp/dali-wheels -xf -
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/dali-wheels/*.whl \
            && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "DALI's wheel parts in .whl-dali/ are incomplete: carry every part SHA256SUMS names" >&2
    fi
fi
"$PYTHON" -c "import omegaconf" 2>/dev/null || { echo "omegaconf is missing: run tests/gpu/wheels.sh where pip \
works and carry .whl here" >&2; exit 2; }
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
# the gpu-marked tests: among them 20 steps of fp16 and of bf16 under torch.cuda.set_sync_debug_mode("error"),
# and (with DALI) two steps of the mini config with the mixed decoder
"$PYTHON" -m pytest -q -rs -m gpu tests/test_gpu.py tests/models/test_densenet.py -p no:cacheprovider \
    2>&1 | tee "$OUT/pytest.txt" || true
grep -Eq "[0-9]+ passed" "$OUT/pytest.txt" && ! grep -Eq "[0-9]+ (failed|error)" "$OUT/pytest.txt" \
    || echo "GPU TESTS FAILED"

# the train loader under reads delayed by 20 ms and a 150 ms step, on this machine's cores (and DALI's mixed
# decoder when DALI is there), against the loader without its feed ahead
FEED_BACKEND=torchvision
"$PYTHON" -c "import nvidia.dali" 2>/dev/null && FEED_BACKEND=dali
"$PYTHON" -m pipeline.bench feed --backend "$FEED_BACKEND" --read-latency-ms 20 --step-ms 150 --batch 32 \
    --device cuda --json "$OUT/feed.json" || echo "BENCH FEED FAILED"

bench() { "$PYTHON" -m pipeline.bench model --model densenet121 --batch "$BATCH" --image-size "$SIZE" \
          --precision bf16 --channels-last --steps "$STEPS" --warmup 5 "$@"; }
bench --compare torchvision --json "$OUT/eager.json"
bench --compile --compare torchvision --json "$OUT/compiled.json"
bench --compare memory_efficient --json "$OUT/memory.json"

"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
eager, compiled, memory = (json.loads((out / f"{n}.json").read_text()) for n in ("eager", "compiled", "memory"))
tv = eager["runs"]["torchvision"]
print(f"\n{'densenet121 bf16 channels-last':<34}{'images/s':>10}{'step ms':>9}{'peak MB':>9}  on {eager['device_name']}")
for name, run in (("torchvision eager", tv), ("ours eager", eager["runs"]["ours"]),
                  ("ours compiled", compiled["runs"]["ours"]),
                  ("ours memory_efficient", memory["runs"]["memory_efficient"])):
    print(f"{name:<34}{run['images_per_s']:>10.0f}{run['step_ms']:>9.1f}{run['peak_MB']:>9.0f}")
best = max(eager["runs"]["ours"]["images_per_s"], compiled["runs"]["ours"]["images_per_s"])
print(f"ours best / torchvision eager: {best / tv['images_per_s']:.2f}x; memory_efficient: step memory "
      f"x{memory['ratio']:.2f}, step time x{memory['time_ratio']:.2f}")
if (out / "feed.json").exists():
    feed = json.loads((out / "feed.json").read_text())
    today = feed["today"]  # the loader without its feed ahead (DALI only)
    print(f"bench feed ({feed['backend']}, batch {feed['batch']}, L={feed['read_latency_ms']:g} ms, "
          f"S={feed['step_ms']:g} ms): data-wait share {feed['data_wait_share']:.3f}, "
          f"{feed['images_per_s']:.0f} images/s" + (f" with read_ahead={feed['read_ahead']}; without: "
          f"{today['data_wait_share']:.3f}, {today['images_per_s']:.0f} images/s" if today else ""))
tests = (out / "pytest.txt").read_text().strip().splitlines()
print(f"gpu tests: {tests[-1] if tests else 'no output'}")
PY
