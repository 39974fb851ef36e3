#!/usr/bin/env bash
# Idle-machine measurements: before (ac2f0de, /work/base) and after (main HEAD), alternated, nothing else running.
L=/work/scratch/idle2
PY=/work/main/.venv/bin/python
cat /proc/loadavg > $L/loads.txt
bench() { # tree out
  (cd /work/$1 && PYTHONPATH=/work/$1 nice -n -10 $PY -m bench.run --device cpu --quick --providers reference,compile,cpp --workloads predict,train,condition --batches 8192 --out $L/$2 > $L/$2.log 2>&1)
  cat /proc/loadavg >> $L/loads.txt
}
bench base before-seed
bench main after-seed
bench base before-seed-2
bench main after-seed-2
(cd /work/main && nice -n -10 $PY -m bench.run --device cpu --quick --providers reference,compile,cpp --configs bytes,notebook --workloads predict,train --batches 2048 --out $L/after-wide > $L/after-wide.log 2>&1)
cat /proc/loadavg >> $L/loads.txt
for t in base main; do
  rm -rf /tmp/idle2-demo-$t
  ( cd /tmp && PYTHONPATH=/work/$t /usr/bin/time -f "$t cpp demo: %e s wall %U s user" nice -n -10 $PY -m aunn_fast demo --backend cpp --quiet --out /tmp/idle2-demo-$t ) >> $L/demo.log 2>&1
  cp /tmp/idle2-demo-$t/metrics.json $L/demo-$t-metrics.json 2>/dev/null
done
rm -rf /tmp/idle2-demo-ref
( cd /tmp && /usr/bin/time -f "reference demo: %e s wall %U s user" nice -n -10 /work/main/.venv/bin/aunn demo --backend reference --quiet --out /tmp/idle2-demo-ref ) >> $L/demo.log 2>&1
cat /proc/loadavg >> $L/loads.txt
touch $L/DONE
#!/usr/bin/env bash
L=/work/scratch/idle2
PY=/work/main/.venv/bin/python
for i in 3 4 5; do
for t in base main; do
  name=$([ $t = base ] && echo before || echo after)-seed-$i
  (cd /work/$t && PYTHONPATH=/work/$t nice -n -10 $PY -m bench.run --device cpu --quick --providers reference,compile,cpp --workloads predict,train,condition --batches 8192 --out $L/$name > $L/$name.log 2>&1)
  cat /proc/loadavg >> $L/loads.txt
done; done
touch $L/MORE_DONE
