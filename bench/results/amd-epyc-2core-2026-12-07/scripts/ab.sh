#!/usr/bin/env bash
# ab.sh what reps rounds trees...
what=$1; reps=$2; rounds=$3; shift 3
for i in $(seq $rounds); do for t in "$@"; do
  echo -n "$t "; (cd /work/scratch/s5 && PYTHONPATH=/work/$t /work/main/.venv/bin/python t.py $what $reps 2>&1 | grep -v building)
done; done
