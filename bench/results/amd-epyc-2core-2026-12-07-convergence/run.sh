#!/usr/bin/env bash
# Convergence matrices of commit 44b6dc6 on the AMD EPYC: cpu demo (seeds 0-4) and digits (seeds 0-2), each with
# the default --threads 2,1 --isa native,avx2.
L=/work/scratch/amdconv2
cd /work/conv
export PYTHONPATH=/work/conv
PY=/work/main/.venv/bin/python
{ date -u; cat /proc/loadavg; } > $L/times.txt
nice -n 5 $PY -m aunn_fast.bench.convergence --out $L/cpu > $L/cpu.log 2>&1
{ date -u; cat /proc/loadavg; } >> $L/times.txt
nice -n 5 $PY -m aunn_fast.bench.convergence --preset digits --seeds 0-2 --out $L/digits > $L/digits.log 2>&1
{ date -u; cat /proc/loadavg; } >> $L/times.txt
touch $L/DONE
