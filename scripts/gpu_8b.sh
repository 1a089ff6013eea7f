#!/usr/bin/env bash
# One device call measuring one 8B scenario with the current code in a sweep of its own (session 5 on):
# the rows that issue 3 is judged on first, then hf's and the fast row's repeats, Unsloth, the default row's
# repeats, the other trainer rows.
#   bash scripts/gpu_8b.sh SCENARIO TAG DEADLINE_SECONDS   (rerun with the same TAG to resume that sweep)
# Carry .whl, .bundles/base.tar.xz (and .bundles/unsloth.tar.xz for its row). Results: $OUT/results.tgz.
sc=$1; tag=$2
end=$(( $(date +%s) + ${3:-570} ))  # the deadline counts the setup too
source scripts/gpu_setup.sh
name=$(basename "$sc" .yaml)
if [ ! -f results/.new8b-$tag-$name ]; then  # the marker travels back in results.tgz
  mkdir -p results && touch results/.new8b-$tag-$name
  step --new "$sc" --repeats 1 --only hf
fi
# the memory-bound row: weights partly streamed from the host (LoRA), embeddings on the host (QLoRA)
lean=tunebench-lean; [ "$name" = llama8b_qlora ] && lean=tunebench-half
step "$sc" --repeats 1 --only hf tunebench tunebench-fast-graph $lean
step "$sc" --repeats 3 --only hf tunebench-fast-graph
step "$sc" --repeats 1 --only unsloth  # side by side (~75 s) before the default row's repeats
step "$sc" --repeats 3 --only tunebench
step "$sc" --repeats 1 --only tunebench-fast tunebench-graph tunebench-lean
[ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" results
exit 0
