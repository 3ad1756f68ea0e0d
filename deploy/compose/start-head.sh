#!/bin/sh
# The compose head: Ray's head node (no GPU, the i2v_head resource: the job manager and its job
# store live here), then the farm, deployed from the mounted Serve config once Ray's dashboard
# answers. Deployed again on every start of this container (Ray keeps no state across restarts;
# the job store on its volume does, and the farm picks its queued and running jobs back up).
set -eu
config="${I2V_SERVE_CONFIG:-/etc/i2v-farm/serve-config.yaml}"

deploy() {
    until wget -q -O /dev/null http://127.0.0.1:8265/api/gcs_healthz; do sleep 2; done
    if serve deploy --address http://127.0.0.1:8265 "$config"; then
        echo "start-head: deployed $config; the farm answers on :8000 once a worker replica runs"
    else
        echo "start-head: 'serve deploy $config' failed (above); fix it, then:" \
             "docker compose exec ray-head serve deploy $config" >&2
    fi
}
deploy &

exec ray start --head --port=6379 --num-gpus=0 --resources='{"i2v_head": 1}' \
    --dashboard-host=0.0.0.0 --metrics-export-port=8080 --block
