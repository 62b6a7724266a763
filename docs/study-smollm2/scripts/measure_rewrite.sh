#!/bin/bash
# Issue 19: re-measure the SmolLM2 profile with marker_before_stop (profile default), 64 prompts x 4 candidates.
cd /work/main
for spec in chain_sum:0.3 gcd:0.3 gsm_symbolic:0.3 chain_sum:1.0 gcd:1.0; do
  task=${spec%%:*}; t=${spec##*:}
  start=$(date +%s)
  OMP_NUM_THREADS=1 .venv/bin/onsft rewrite --model smollm2-135m --data runs/rewrite-smollm2/$task.jsonl \
    --out runs/rewrite-smollm2/hold/$task-t$t --own_samples 0 --samples_per_prompt 4 --max_new_tokens 160 \
    --temperature $t --chunk_size 64 --no_progress > runs/rewrite-smollm2/hold/$task-t$t.log 2>&1
  echo "$task t=$t rc=$? $(( $(date +%s) - start ))s" >> runs/rewrite-smollm2/hold/done.txt
done
