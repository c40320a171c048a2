#!/usr/bin/env bash
# The compose `prepare` job: the demo's build stages (`retina-train demo --no-serve`, as `make demo`: the
# shipped model zoo:tiny-synth exported and indexed, nothing trained) into RETINA_DATA (the named volume,
# /data). Each stage is reused when it is already there for the same inputs (by fingerprint), so a second
# `docker compose up` starts the API at once. Sizes from the environment (defaults as the demo's):
# RETINA_DEMO_N=3000 RETINA_DEMO_SEED=1.
# The API reads RETINA_DATA/bundle and RETINA_DATA/index; index.json records the bundle's absolute path, so
# the API must mount the volume at the same path as this job.
set -euo pipefail

D="${RETINA_DATA:-/data}"
echo "prepare: data folder $D"
exec retina-train demo --dir "$D" --no-serve --n "${RETINA_DEMO_N:-3000}" --seed "${RETINA_DEMO_SEED:-1}"
