#!/usr/bin/env bash
# Build .gpufarm/: what `python -m bench.gpu_farm` needs on a GPU machine that has PyTorch and
# transformers but no Ray, FastAPI, MinIO client or network, in under 64 MiB (what such a lease
# carries). Run from the repository root on any x86-64 Linux with pip; the GPU machine's Python
# is 3.12. Then, there:
#   mkdir -p /tmp/site /tmp/ff && tar -xJf .gpufarm/ray312.tar.xz -C /tmp/site \
#   && python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpufarm/whl/*.whl \
#   && tar -xzf .gpufarm/imageio_ffmpeg.tgz -C /tmp/site && xz -dc .gpufarm/ffmpeg4.xz > /tmp/ff/ffmpeg \
#   && chmod +x /tmp/ff/ffmpeg && PYTHONPATH=/tmp/site:$PWD IMAGEIO_FFMPEG_EXE=/tmp/ff/ffmpeg python3 -m bench.gpu_farm
# (.gpufarm/ is listed in .git/info/exclude by this script, never committed.)
set -euo pipefail
PY=${PY:-3.12}
OUT=.gpufarm
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
grep -qx "/$OUT/" .git/info/exclude 2>/dev/null || echo "/$OUT/" >> .git/info/exclude
mkdir -p "$OUT/whl"
dl() {  # binary wheels for the GPU machine's Python, no dependencies (each is named)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform manylinux2010_x86_64 -d "$@"
}
pin() { grep -i -E "^${1//-/[-_]}==" constraints.txt | head -1; }

# Ray without Java, RLlib, Data, Tune, Train, LLM and the dashboard's web UI (240 MB -> 21 MB xz).
dl "$WORK" "$(pin ray)"
python3 -m pip install -q --no-deps --target "$WORK/site" --python-version "$PY" --only-binary=:all: \
  --platform manylinux2014_x86_64 "$WORK"/ray-*.whl
(cd "$WORK/site" && rm -rf ray/jars ray/rllib ray/data ray/tune ray/train ray/llm ray/dashboard/client \
  && find . -name __pycache__ -type d -prune -exec rm -rf {} + \
  && tar -cf - ray ray-*.dist-info | xz -T0 -9 > "$OLDPWD/$OUT/ray312.tar.xz")

# What Ray Serve and the farm import that the GPU image lacks (its grpcio is 1.84: reflection to match).
for n in aiohttp-cors annotated-types argon2-cffi argon2-cffi-bindings cffi pycparser colorful diffusers fastapi \
    fastapi-offline google-api-core google-auth googleapis-common-protos proto-plus pyasn1 pyasn1-modules \
    opencensus opencensus-context opentelemetry-api opentelemetry-exporter-prometheus opentelemetry-proto \
    opentelemetry-sdk opentelemetry-semantic-conventions importlib-metadata jsonschema jsonschema-specifications \
    referencing rpds-py minio mmh3 pycryptodome pydantic pydantic-core python-multipart smart-open starlette \
    typing-inspection uvicorn watchfiles httptools; do
  dl "$OUT/whl" "$(pin "$n")"
done
dl "$OUT/whl" grpcio-reflection==1.84.0

# imageio-ffmpeg's Python part, and an older, smaller static ffmpeg with libx264 (4.2.2, 74 MB -> 19 MB xz).
dl "$WORK" "$(pin imageio-ffmpeg)"
dl "$WORK" imageio-ffmpeg==0.4.9
(cd "$WORK" && mkdir new old && unzip -q -d new imageio_ffmpeg-0.8*.whl && unzip -q -d old imageio_ffmpeg-0.4.9*.whl)
rm -f "$WORK"/new/imageio_ffmpeg/binaries/ffmpeg*
tar -czf "$OUT/imageio_ffmpeg.tgz" -C "$WORK/new" .
xz -T0 -9 -c "$WORK"/old/imageio_ffmpeg/binaries/ffmpeg-linux64-v4.2.2 > "$OUT/ffmpeg4.xz"
du -sh "$OUT"
