#!/usr/bin/env bash
# AMD EPYC measurements of commit 378c919: three quick bench runs, the wide configs, the demo pair
# (seed-0: the same bench command, run by hand before this script).
L=/work/scratch/amd
PY=/work/main/.venv/bin/python
cat /proc/loadavg > $L/loads.txt
for i in 1 2 3; do
  (cd /work/main && nice -n -10 $PY -m bench.run --device cpu --quick --providers reference,compile,cpp --workloads predict,train,condition --batches 8192 --out $L/seed-$i > $L/seed-$i.log 2>&1)
  cat /proc/loadavg >> $L/loads.txt
done
(cd /work/main && nice -n -10 $PY -m bench.run --device cpu --quick --providers reference,compile,cpp --configs bytes,notebook --workloads predict,train --batches 2048 --out $L/wide > $L/wide.log 2>&1)
cat /proc/loadavg >> $L/loads.txt
for be in cpp reference; do
  rm -rf /tmp/amd-demo-$be
  ( cd /tmp && /usr/bin/time -f "$be demo: %e s wall %U s user" nice -n -10 /work/main/.venv/bin/aunn demo --backend $be --quiet --out /tmp/amd-demo-$be ) >> $L/demo.log 2>&1
  cp /tmp/amd-demo-$be/metrics.json $L/demo-$be-metrics.json 2>/dev/null
done
cat /proc/loadavg >> $L/loads.txt
touch $L/DONE
