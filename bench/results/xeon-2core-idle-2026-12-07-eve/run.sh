#!/usr/bin/env bash
# Final idle-machine measurements: before (ac2f0de, /work/base) and after (main HEAD), alternated five times,
# nothing else running; then the wide configs and the demo pair on the after build.
L=/work/scratch/idle3
PY=/work/main/.venv/bin/python
cat /proc/loadavg > $L/loads.txt
for i in 1 2 3 4 5; do
for t in base main; do
  name=$([ $t = base ] && echo before || echo after)-seed-$i
  (cd /work/$t && PYTHONPATH=/work/$t nice -n -10 $PY -m bench.run --device cpu --quick --providers reference,compile,cpp --workloads predict,train,condition --batches 8192 --out $L/$name > $L/$name.log 2>&1)
  cat /proc/loadavg >> $L/loads.txt
done; done
(cd /work/main && nice -n -10 $PY -m bench.run --device cpu --quick --providers reference,compile,cpp --configs bytes,notebook --workloads predict,train --batches 2048 --out $L/after-wide > $L/after-wide.log 2>&1)
cat /proc/loadavg >> $L/loads.txt
for be in cpp reference; do
  rm -rf /tmp/idle3-demo-$be
  ( cd /tmp && /usr/bin/time -f "$be demo: %e s wall %U s user" nice -n -10 /work/main/.venv/bin/aunn demo --backend $be --quiet --out /tmp/idle3-demo-$be ) >> $L/demo.log 2>&1
  cp /tmp/idle3-demo-$be/metrics.json $L/demo-$be-metrics.json 2>/dev/null
done
cat /proc/loadavg >> $L/loads.txt
touch $L/DONE
