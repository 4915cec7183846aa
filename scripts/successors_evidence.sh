#!/usr/bin/env bash
# The real-image runs behind docs/successors.md: each successor option on and off, same seed, on Fashion-MNIST
# subsets in CIFAR-10's layout (scripts/fashion_mnist_subsets.py), sized for a CPU.
#
#   scripts/successors_evidence.sh DATA OUT [PARALLEL]
#
# DATA: the folder fashion_mnist_subsets.py wrote; OUT: gets one run folder and one .log per run; PARALLEL: runs at
# once (default 2, one thread each). $PYTHON picks the interpreter (default: python3).
set -euo pipefail
data=${1:?give DATA, the folder scripts/fashion_mnist_subsets.py wrote}
out=${2:?give OUT, the parent of the run folders}
parallel=${3:-2}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
common=(--warm_up 4 --num_epochs 12 --batch_size 32 --eval_batch_size 500 --seed 1 --save_loss_every 0)
asym=(--data_path "$data/all" --noise_mode asym --r 0.4)
open=(--data_path "$data/open" --noise_mode sym --r 0.2 --ood_ratio 0.2 --ood_path "$data/open_ood.npz")

# run_one NAME ARGS... and launch NAME ARGS... (at most $parallel at once)
source "$repo/scripts/evidence_runs.sh"

launch asym_global "${asym[@]}"
launch asym_classwise "${asym[@]}" --division classwise
launch open_plain "${open[@]}"
launch open_knn "${open[@]}" --ood_filter knn --ood_interval 2 --ood_remove 0.2
launch open_mixe "${open[@]}" --mix input+embedding
wait
