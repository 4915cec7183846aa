#!/usr/bin/env bash
# The real-image runs behind docs/successors.md's self-supervised start: a SimCLR pre-training, then DivideMix with
# and without its backbone at 80% symmetric noise, and the kNN filter with and without it on open-set noise; on
# Fashion-MNIST subsets in CIFAR-10's layout (scripts/fashion_mnist_subsets.py --train 2000), sized for a CPU.
#
#   scripts/pretraining_evidence.sh DATA OUT [PARALLEL]
#
# DATA: the folder fashion_mnist_subsets.py wrote; OUT: gets one run folder and one .log per run; PARALLEL: runs at
# once after the pre-training (default 2, one thread each). $PYTHON picks the interpreter (default: python3).
set -euo pipefail
data=${1:?give DATA, the folder scripts/fashion_mnist_subsets.py wrote}
out=${2:?give OUT, the parent of the run folders}
parallel=${3:-2}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
backbone=$out/simclr/simclr_cifar10_backbone.pth
common=(--warm_up 4 --batch_size 32 --eval_batch_size 500 --seed 1 --save_loss_every 0 --net_width 16)
sym80=(--data_path "$data/all" --noise_mode sym --r 0.8 --num_epochs 30)
open=(--data_path "$data/open" --noise_mode sym --r 0.2 --ood_ratio 0.2 --ood_path "$data/open_ood.npz"
      --ood_filter knn --ood_interval 2 --ood_remove 0.2 --num_epochs 12)

mkdir -p "$out"
# the pre-training sees the ten-class bed's training images, without their labels
OMP_NUM_THREADS=1 "$py" "$repo/Pretrain_simclr.py" --data_path "$data/all" --output_dir "$out/simclr" --epochs 60 \
    --batch_size 128 --lr 0.125 --warm_epochs 5 --net_width 16 --eval_batch_size 500 --seed 1 > "$out/simclr.log" 2>&1

# run_one NAME ARGS... and launch NAME ARGS... (at most $parallel at once)
source "$repo/scripts/evidence_runs.sh"

launch sym80_plain "${sym80[@]}"
launch sym80_pretrained "${sym80[@]}" --pretrained "$backbone"
launch open_knn_plain "${open[@]}"
launch open_knn_pretrained "${open[@]}" --pretrained "$backbone"
wait
