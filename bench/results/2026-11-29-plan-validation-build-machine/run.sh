#!/bin/bash
# Build-machine comparison (issue 7): calibrate the CPU stand-in, then e2e at the quick configuration and two variants.
cd /tmp/build-nc
mkdir -p /tmp/kvq /tmp/bm/runs
t0=$(date +%s)
./bin/kvtier calibrate --quick --gpu cpu-standin --dir /tmp/kvq --json --out /tmp/bm/runs/calibrated-profile.json > /tmp/bm/runs/calibrate.json 2> /tmp/bm/runs/calibrate.log
echo "calibrate rc=$? $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
python3 /work/main/bench/validate_plan.py run --kvtier ./bin/kvtier --dir /tmp/kvq --out /tmp/bm/runs 256K:64MiB:256MiB:64MiB 256K:64MiB:768MiB:64MiB 256K:256MiB:768MiB:64MiB
echo "runs $(( $(date +%s) - t0 )) s"
git -C /work/main rev-parse HEAD > /tmp/bm/runs/commit.txt
touch /tmp/bm/done
