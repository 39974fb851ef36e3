#!/usr/bin/env bash
# Idle-machine measurements: before (073d37e) and after (main HEAD), one after the other, nothing else running.
set -x
L=/work/scratch/idle
B=/work/scratch/before
A=/work/main
uptime > $L/uptime_start.txt
cat /proc/loadavg
cd $B && nice -n -10 .venv/bin/python -m aunn_fast.bench.run --device cpu --quick --providers reference,compile,cpp --workloads predict,train,condition --batches 8192 --out $L/before-seed > $L/before-seed.log 2>&1
cat /proc/loadavg >> $L/loads.txt
cd $A && nice -n -10 .venv/bin/python -m aunn_fast.bench.run --device cpu --quick --providers reference,compile,cpp --workloads predict,train,condition --batches 8192 --out $L/after-seed > $L/after-seed.log 2>&1
cat /proc/loadavg >> $L/loads.txt
cd $A && nice -n -10 .venv/bin/python -m aunn_fast.bench.run --device cpu --quick --providers reference,compile,cpp --configs bytes,notebook --workloads predict,train --batches 2048 --out $L/after-wide > $L/after-wide.log 2>&1
cat /proc/loadavg >> $L/loads.txt
for i in 1 2; do
  for be in reference cpp; do
    rm -rf /tmp/idle-demo-$be
    ( cd /tmp && /usr/bin/time -f "$be run $i: %e s wall %U s user" nice -n -10 $A/.venv/bin/aunn demo --backend $be --quiet --out /tmp/idle-demo-$be ) >> $L/demo.log 2>&1
  done
done
cat /proc/loadavg >> $L/loads.txt
rm -rf /tmp/idle-digits
( cd /tmp && /usr/bin/time -f "digits: %e s wall %U s user" nice -n -10 $A/.venv/bin/aunn demo --preset digits --out /tmp/idle-digits ) > $L/digits.log 2>&1
cp /tmp/idle-digits/metrics.json $L/digits-metrics.json 2>/dev/null
cat /proc/loadavg >> $L/loads.txt
touch $L/DONE
