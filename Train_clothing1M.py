"""DivideMix on Clothing1M (14 classes, real-world label noise) with ImageNet-pretrained ResNet-50s.

    python Train_clothing1M.py --data_path ./clothing1M

Differences from CIFAR (the authors' Train_clothing1M.py; docs/paper.md): each epoch trains on fresh class-balanced
draws of the noisy training list; the division used in an epoch was made at the END of the previous one, each net on
its own draw; only the labeled rows enter the loss (Lx + penalty); warm-up adds the confidence penalty; the
best-validation weights of each net are kept and tested together at the end.
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import torchvision

from checkpointing import run_state
from cli import UserError, run_main
from dataloader_clothing1M import Clothing1M
from distributed import (check_sync_bn, init_distributed, is_main_process, local_batch_size, make_shard, seed_process,
                         sync_buffers, world_size, wrap_ddp)
from dividemix import (DivideMixConfig, Precision, co_divide, co_train, co_warmup, evaluate, gmm_summary,
                       set_learning_rate)
from epochs import BestWeights, end_epoch
from flags import (AT_LEAST_ONE, NON_NEGATIVE, TRAIN_FLAGS, FlagParser, Range, add_engine_arguments,
                   add_resume_argument, add_tensorboard_argument, check_flags, defining_args)
from imagelist import add_loader_arguments
from run_folder import RunDir, run_config

LR_DECAY_EPOCH = 40
# The flags that may differ at --resume: where the files are (the training labels are checked by their digest),
# how long, where and how fast it runs. Every other flag defines the run: --resume refuses a checkpoint made with
# another value.
RESUME_MAY_CHANGE = ("num_epochs", "output_dir", "resume", "gpuid", "data_path", "id", "num_workers",
                     "max_bad_images", "amp", "channels_last", "sync_bn")
# The settings the run prints when it starts.
SHOWN_SETTINGS = ("batch_size", "lr", "alpha", "lambda_u", "p_threshold", "T", "seed", "num_class", "num_batches",
                  "warm_up", "pretrained", "image_size", "division")
# Allowed values of every numeric flag, checked before anything is read or written. Epoch 0 must be a warm-up
# epoch: the division a co-divide epoch trains on is made at the end of the epoch before.
FLAG_RANGES = {**TRAIN_FLAGS, "warm_up": Range(1, note="epoch 0 warms up: a division needs an epoch before it"),
               "num_batches": AT_LEAST_ONE, "image_size": Range(33, note="ResNet-50's last grid must be at least 2x2"),
               "num_workers": NON_NEGATIVE, "max_bad_images": NON_NEGATIVE}


def get_args_parser():
    """The original code's flags and defaults, plus the new ones."""
    p = FlagParser(description="DivideMix on Clothing1M")
    p.add_argument("--batch_size", default=32, type=int,
                   help="labeled and unlabeled batch size (warm-up uses twice this); the global batch under torchrun")
    p.add_argument("--lr", "--learning_rate", default=0.002, type=float, dest="lr",
                   help=f"initial learning rate, divided by 10 from epoch {LR_DECAY_EPOCH}")
    p.add_argument("--alpha", default=0.5, type=float, help="MixMatch's Beta(alpha, alpha)")
    p.add_argument("--lambda_u", default=0, type=float, help="weight of the unlabeled loss (unused: labeled rows only)")
    p.add_argument("--p_threshold", default=0.5, type=float, help="clean-probability threshold tau")
    p.add_argument("--T", default=0.5, type=float, help="sharpening temperature")
    p.add_argument("--num_epochs", default=80, type=int, help="last epoch (epochs 0..num_epochs are run)")
    p.add_argument("--id", default="clothing1m", type=str, help="file-name prefix of the run's logs and checkpoint")
    p.add_argument("--data_path", default="../../Clothing1M/data", type=str,
                   help="the Clothing1M folder: its five list files and image folders (see docs/real_world.md)")
    p.add_argument("--seed", default=123, type=int, help="one integer seeds Python, numpy and torch")
    p.add_argument("--gpuid", default=0, type=int, help="CUDA device when CUDA is available (ignored under torchrun)")
    p.add_argument("--num_class", default=14, type=int, help="classes of the nets' output (Clothing1M has 14)")
    p.add_argument("--num_batches", default=1000, type=int, help="batches per epoch (sets the size of each draw)")
    p.add_argument("--warm_up", default=1, type=int, help="warm-up epochs")
    p.add_argument("--output_dir", default="./checkpoint", type=str, help="logs, weights and checkpoint go here")
    add_resume_argument(p)
    add_tensorboard_argument(p)
    p.add_argument("--pretrained", default="imagenet",
                   help="'imagenet' (torchvision's IMAGENET1K_V1 weights), a state-dict file, or 'none'")
    p.add_argument("--image_size", default=224, type=int, help="crop size (resize = size * 256 / 224); paper: 224")
    add_loader_arguments(p)  # --num_workers, --max_bad_images
    add_engine_arguments(p)  # --amp, --channels_last, --division, --sync_bn
    return p


def create_model(pretrained, num_class, device, precision):
    """ResNet-50 with ImageNet weights (or a local state dict, or none) and a new num_class-way linear head."""
    weights_enum = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    if pretrained == "imagenet":
        try:
            net = torchvision.models.resnet50(weights=weights_enum)
        except Exception as exc:
            cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights_enum.url))
            raise UserError(f"cannot load the ImageNet weights of ResNet-50 ({type(exc).__name__}): place "
                            f"{os.path.basename(weights_enum.url)} at {cache}, or pass --pretrained PATH to a state "
                            "dict, or --pretrained none") from None
    else:
        net = torchvision.models.resnet50(weights=None)
        if pretrained != "none":
            try:
                state = torch.load(pretrained, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise UserError(f"--pretrained {pretrained}: cannot read it as a state dict ({type(exc).__name__}); "
                                "pass 'imagenet', 'none' or a ResNet-50 state-dict file") from None
            state = {k: v for k, v in state.get("state_dict", state).items() if not k.startswith("fc.")}
            missing = [k for k in net.load_state_dict(state, strict=False).missing_keys if not k.startswith("fc.")]
            if missing:
                raise UserError(f"--pretrained {pretrained} lacks {len(missing)} ResNet-50 weights (e.g. {missing[0]})")
    net.fc = nn.Linear(net.fc.in_features, num_class)
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if precision.channels_last else net


def main(args):
    """Check the settings, open the run folder (lock, logs, checkpoint), then train in it."""
    check_flags(args, FLAG_RANGES)
    device = init_distributed(args.gpuid)
    local_batch_size(args.batch_size)
    with RunDir(args.output_dir, args.id, {"acc": args.id + ".txt", "json": args.id + "_log.jsonl"},
                carried=("_net1.pth.tar", "_net2.pth.tar"), main=is_main_process(),
                tensorboard=args.tensorboard) as run:
        train(args, run, device)
    return 0


def train(args, run, device):
    """Set up, run epochs start..num_epochs (train, validate, divide for the next epoch), then test."""
    # ---- resume or start -----------------------------------------------------------------------------------
    defining = defining_args(args, RESUME_MAY_CHANGE)
    resume = run.open_checkpoint(args.resume, defining)
    sync_bn = check_sync_bn(args.sync_bn, device)
    precision = Precision.from_args(args, device)
    print("settings: " + ", ".join(f"{k}={getattr(args, k)}" for k in SHOWN_SETTINGS + ("amp",)), flush=True)
    seed_process(args.seed)
    shard = make_shard(args.seed)
    # the class-balanced draws of the training list: with several processes every rank must draw the same
    draws = shard.numpy if shard is not None else np.random

    # ---- data and models -----------------------------------------------------------------------------------
    data = Clothing1M(args.data_path, args.num_class, args.batch_size, args.num_batches, args.image_size,
                      args.num_workers, device, args.max_bad_images, shard)
    run.check_labels(resume, defining, data.train_labels, f"{args.data_path}/noisy_label_kv.txt")
    print(f"data: {len(data.train_paths)} noisy training images, {len(data.val_paths)} val, {len(data.test_paths)} "
          f"test; {args.num_batches * args.batch_size} drawn for each loss evaluation", flush=True)
    nets = [create_model(args.pretrained, args.num_class, device, precision) for _ in range(2)]
    optimizers = [optim.SGD(n.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-3) for n in nets]
    cfg = DivideMixConfig.from_args(args, precision, unlabeled_loss=False)
    divisions = [None, None]  # per net: (indices of its draw, clean probability), made at the end of an epoch
    best = BestWeights(run, resume["best"] if resume is not None else None)
    start_epoch = 0
    if resume is not None:
        start_epoch = run.restore(resume, nets, optimizers)
        divisions = resume["divisions"]
        data.bad_images.restore(resume.get("bad_images", []))
    else:
        run.begin(run_config("Train_clothing1M.py", args, device, len(data.train_paths),
                             labels_sha256=defining["labels_sha256"], world_size=world_size(), sync_bn=sync_bn))
    train_nets = wrap_ddp(nets, device, sync_bn)

    # ---- epochs --------------------------------------------------------------------------------------------
    for epoch in range(start_epoch, args.num_epochs + 1):
        t_epoch = time.perf_counter()
        if shard is not None:
            shard.start_epoch(epoch)
        lr = [set_learning_rate(opt, args.lr, epoch, LR_DECAY_EPOCH) for opt in optimizers][0]
        if epoch < args.warm_up:
            phase = "warmup"
            records, timing = co_warmup(epoch, train_nets, optimizers, lambda: data.warmup_loader(draws), device, True,
                                        precision)
        else:
            phase = "train"

            def make_loaders(k, pred, prob):
                """Loaders of net k's division of its own draw."""
                idx = divisions[k][0]
                return data.labeled_loader(idx, pred, prob), data.unlabeled_loader(idx, pred)

            records, timing = co_train(epoch, train_nets, optimizers, [d[1] for d in divisions], make_loaders, cfg,
                                       device)
        sync_buffers(nets)

        # validation of each net alone; each keeps its best weights
        t0 = time.perf_counter()
        accs = [evaluate([net], data.val_loader, device, precision=precision)[0] for net in nets]
        timing["val"] = time.perf_counter() - t0
        best.update(nets, accs)
        run.logs.write("acc", "Validation Epoch:%d      Acc1:%.2f  Acc2:%.2f\n" % (epoch, accs[0], accs[1]))

        # co-divide on a fresh draw per net: the division for the next epoch
        drawn = []

        def draw_loader(k):
            """Net k's draw of the training list, as a loss-evaluation loader."""
            drawn.append(data.draw(args.num_batches * args.batch_size, draws))
            return data.eval_loader(drawn[k])

        labels = (lambda k: np.asarray(data.train_labels)[drawn[k]]) if args.division == "classwise" else None
        # no overlap: each draw comes after the previous net's GMM fit, which also draws from numpy's generator
        new_divisions, divide_timing = co_divide(nets, draw_loader, cfg, device, labels=labels, overlap=False)
        timing.update(divide_timing)
        for k, (prob, _, gmm, stats) in enumerate(new_divisions):
            divisions[k] = (drawn[k], prob)
            records[k].update(stats, gmm=gmm_summary(gmm))

        data.bad_images.share()
        end_epoch(run, epoch, phase, lr, t_epoch, f"val {accs[0]:.2f}% / {accs[1]:.2f}%", records, timing,
                  run_state(epoch, defining, args, nets, optimizers, divisions=divisions, best=best.best,
                            bad_images=data.bad_images.state()),
                  scores={"val_acc1": accs[0], "val_acc2": accs[1]}, extra=data.bad_images.epoch_record(),
                  details=f"  labeled {records[0]['labeled']}/{records[1]['labeled']} of the next draws  bad images "
                          f"{data.bad_images.count}", probs=[d[1] for d in divisions])

    # ---- test: the two best-validation nets together -------------------------------------------------------
    best.load_into(nets, device)
    acc = evaluate(nets, data.test_loader(), device, precision=precision)[0]
    data.bad_images.share()
    run.logs.write("acc", "Test Accuracy:%.2f\n" % acc)
    run.logs.write_json("json", {"phase": "test", "test_acc": acc, **data.bad_images.epoch_record()})
    print(f"test accuracy of the best-validation nets: {acc:.2f}%", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
