#!/usr/bin/env bash
# `make demo`: the whole job on a small real dataset, as a user would run it.
#   1. scikit-learn's handwritten digits as an ImageNet-style tree (python -m pipeline.sample)
#   2. a Ray head on 127.0.0.1 and `ray job submit -- python jobs/preprocess.py`; Ray is stopped
#      however this script ends
#   3. python -m trainer.run with SGD and Caffe's recipe, on the best device present
#   4. python -m trainer.bench --shards
#   5. python -m trainer.predict on a few val digits, python -m trainer.evaluate
# Everything it makes is reused by the next run: the tree is kept, the preprocessing resumes
# (and finds nothing to do), the training resumes from its checkpoint.
set -euo pipefail
DATA=${DATA:-data/digits}
SHARDS=${SHARDS:-data/digits-shards}
RUN=${RUN:-runs/demo}
EPOCHS=${EPOCHS:-5}
# keep every Ray server on 127.0.0.1, with token auth and a token of this demo's own (see docs/distributed.md)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python -c "import secrets; print(secrets.token_hex(32))")}

# Each long step runs in the background and is waited for: a trapped signal interrupts `wait` at
# once, while a foreground child that catches Ctrl-C itself (as `ray job submit` does) would keep
# the script going. On any exit the step in flight is stopped, and Ray if this script started it.
child="" ray_started=""
cleanup() {
    [ -n "$child" ] && kill "$child" 2>/dev/null
    [ -n "$ray_started" ] && ray stop --force >/dev/null 2>&1
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM
step() { "$@" & child=$!; wait "$child"; child=""; }

echo "== 1/5 sample tree: $DATA"
step python -m pipeline.sample --out "$DATA"

echo "== 2/5 preprocessing on a Ray head at 127.0.0.1 -> $SHARDS"
if ! ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --disable-usage-stats \
        --num-cpus "$(nproc)" >"${TMPDIR:-/tmp}/demo-ray-start.log" 2>&1; then
    cat "${TMPDIR:-/tmp}/demo-ray-start.log"
    echo "demo: could not start a Ray head (is one already running here? \`ray stop\`, then make demo again)" >&2
    exit 1
fi
ray_started=1
step ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
    python jobs/preprocess.py --src "$(realpath "$DATA")" --out "$(realpath -m "$SHARDS")"
ray stop --force >/dev/null 2>&1
ray_started=""

echo "== 3/5 training: $RUN"
resume=()
[ -f "$RUN/checkpoint.pt" ] && resume=(--resume)
# SGD at the paper's lr 0.01, momentum 0.9 and weight decay 5e-4, with Caffe's bvlc_alexnet init (biases
# 0.1, fc6-7 at std 0.005): the paper's text (biases 1) collapses on these digits (docs/training.md, "Recipes")
step python -m trainer.run --shards "$SHARDS" --out "$RUN" --epochs "$EPOCHS" --batch-size 32 --recipe caffe \
    --log-every 15 "${resume[@]}"

echo "== 4/5 input-pipeline benchmark"
step python -m trainer.bench --shards "$SHARDS" --batch-size 32 --seconds 5 --json "$RUN/bench.json" \
    --plot "$RUN/bench.png"

echo "== 5/5 the trained network on a few digits it has not trained on (val/), then its confusions"
step python -m trainer.predict --checkpoint "$RUN/checkpoint.pt" --top 3 $(ls "$DATA"/val/*/* | sed -n '1~40p')
step python -m trainer.evaluate --checkpoint "$RUN/checkpoint.pt" --shards "$SHARDS" --confused 5

python - "$RUN" "$SHARDS" <<'PY'
import json, sys
run, shards = sys.argv[1], sys.argv[2]
lines = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
epoch = [m for m in lines if m["kind"] == "epoch"][-1]
final = [m for m in lines if m["kind"] == "final"][-1]
print(f"""
demo: done. val top-1 error {100 * epoch['top1']:.1f}% (centre crop), {100 * final['top1_ten_crop']:.1f}% (ten-crop); chance is 90%
  shards      {shards}/ (manifest.json, pca.json, rejects.jsonl)
  run folder  {run}/ (config.json, metrics.jsonl, checkpoint.pt)
  pictures    {run}/kernels.png, {run}/curves.png, {run}/bench.png
  benchmark   {run}/bench.json (the table above)
  TensorBoard tensorboard --logdir {run.rsplit("/", 1)[0] if "/" in run else "."}  (event files in {run}/)""")
PY
