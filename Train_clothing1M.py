"""DivideMix on Clothing1M (14 classes, real-world label noise) with ImageNet-pretrained ResNet-50s.

    python Train_clothing1M.py --data_path ./clothing1M

Differences from CIFAR (SPEC section 2): each epoch trains on fresh class-balanced draws of the noisy training
list; the division used in an epoch was made at the END of the previous one, each net on its own draw; only the
labeled rows enter the loss (Lx + penalty); warm-up adds the confidence penalty; the best-validation weights of
each net are kept and tested together at the end.
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import torchvision

from checkpointing import atomic_save, run_state
from cli import UserError, run_main
from dataloader_clothing1M import Clothing1M
from distributed import (check_sync_bn, init_distributed, is_main_process, local_batch_size, make_shard, on_main,
                         seed_process, sync_buffers, world_size, wrap_ddp)
from dividemix import (DivideMixConfig, Precision, co_divide, co_train, co_warmup, eval_train, evaluate, gmm_summary,
                       normalise_losses, set_learning_rate)
from flags import AT_LEAST_ONE, NON_NEGATIVE, TRAIN_FLAGS, FlagParser, Range, add_engine_arguments, check_flags
from imagelist import add_loader_arguments
from run_folder import RunDir, run_config
from utils import json_safe

LR_DECAY_EPOCH = 40
DEFINING_ARGS = ("batch_size", "lr", "alpha", "lambda_u", "p_threshold", "T", "seed", "num_class", "num_batches",
                 "warm_up", "pretrained", "image_size", "division")
# Allowed values of every numeric flag, checked before anything is read or written. Epoch 0 must be a warm-up
# epoch: the division a co-divide epoch trains on is made at the end of the epoch before.
FLAG_RANGES = {**TRAIN_FLAGS, "warm_up": Range(1, note="epoch 0 warms up: a division needs an epoch before it"),
               "num_batches": AT_LEAST_ONE, "image_size": Range(32, note="ResNet-50 reduces it 32-fold"),
               "num_workers": NON_NEGATIVE, "max_bad_images": NON_NEGATIVE}


def get_args_parser():
    """The original code's flags and defaults, plus the new ones."""
    p = FlagParser(description="DivideMix on Clothing1M")
    p.add_argument("--batch_size", default=32, type=int)
    p.add_argument("--lr", "--learning_rate", default=0.002, type=float, dest="lr")
    p.add_argument("--alpha", default=0.5, type=float, help="parameter for Beta")
    p.add_argument("--lambda_u", default=0, type=float, help="weight for unsupervised loss (unused: labeled rows only)")
    p.add_argument("--p_threshold", default=0.5, type=float, help="clean probability threshold")
    p.add_argument("--T", default=0.5, type=float, help="sharpening temperature")
    p.add_argument("--num_epochs", default=80, type=int, help="last epoch (epochs 0..num_epochs are run)")
    p.add_argument("--id", default="clothing1m", type=str)
    p.add_argument("--data_path", default="../../Clothing1M/data", type=str)
    p.add_argument("--seed", default=123, type=int)
    p.add_argument("--gpuid", default=0, type=int)
    p.add_argument("--num_class", default=14, type=int)
    p.add_argument("--num_batches", default=1000, type=int, help="batches per epoch (sets the size of each draw)")
    p.add_argument("--warm_up", default=1, type=int, help="warm-up epochs")
    p.add_argument("--output_dir", default="./checkpoint", type=str)
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the checkpoint in --output_dir, or from the given checkpoint file")
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
                carried=("_net1.pth.tar", "_net2.pth.tar"), main=is_main_process()) as run:
        train(args, run, device)
    return 0


def train(args, run, device):
    """Set up, run epochs start..num_epochs (train, validate, divide for the next epoch), then test."""
    # ---- resume or start -----------------------------------------------------------------------------------
    best_paths = [run.path(f"_net{k}.pth.tar") for k in (1, 2)]
    defining = {k: getattr(args, k) for k in DEFINING_ARGS}
    resume = run.open_checkpoint(args.resume, defining)
    sync_bn = check_sync_bn(args.sync_bn, device)
    precision = Precision.from_args(args, device)
    print("settings: " + ", ".join(f"{k}={getattr(args, k)}" for k in DEFINING_ARGS + ("amp",)), flush=True)
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
    best = [0.0, 0.0]
    start_epoch = 0
    if resume is not None:
        start_epoch = run.restore(resume, nets, optimizers)
        divisions, best = resume["divisions"], resume["best"]
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
        for k in range(2):
            if accs[k] > best[k]:
                best[k] = accs[k]
                if run.main:
                    atomic_save(nets[k].state_dict(), best_paths[k])
        run.logs.write("acc", "Validation Epoch:%d      Acc1:%.2f  Acc2:%.2f\n" % (epoch, accs[0], accs[1]))

        # loss evaluation on a fresh draw per net: the division for the next epoch
        for k, net in enumerate(nets):
            t0 = time.perf_counter()
            idx = data.draw(args.num_batches * args.batch_size, draws)
            losses = eval_train(net, data.eval_loader(idx), device, precision)
            labels = np.asarray(data.train_labels)[idx] if args.division == "classwise" else None
            prob, _, gmm, stats = on_main(co_divide, [normalise_losses(losses)], args.p_threshold, 1, None, labels)
            divisions[k] = (idx, prob)
            records[k].update(stats, gmm=gmm_summary(gmm))
            timing[f"eval{k + 1}"] = time.perf_counter() - t0

        data.bad_images.share()
        seconds = time.perf_counter() - t_epoch
        run.logs.write_json("json", json_safe({"epoch": epoch, "phase": phase, "lr": lr, "val_acc1": accs[0],
                                               "val_acc2": accs[1], "net1": records[0], "net2": records[1],
                                               **data.bad_images.epoch_record(), "seconds": seconds,
                                               "time": timing}))
        print(f"epoch {epoch:3d} {phase:6s} val {accs[0]:.2f}% / {accs[1]:.2f}%  lr {lr:g}  {seconds:.1f}s  labeled "
              f"{records[0]['labeled']}/{records[1]['labeled']} of the next draws  bad images {data.bad_images.count}",
              flush=True)
        run.save(run_state(epoch, defining, args, nets, optimizers, divisions=divisions, best=best,
                           bad_images=data.bad_images.state()))

    # ---- test: the two best-validation nets together -------------------------------------------------------
    for k in range(2):
        if os.path.exists(best_paths[k]):
            nets[k].load_state_dict(torch.load(best_paths[k], map_location=device, weights_only=True))
    acc = evaluate(nets, data.test_loader(), device, precision=precision)[0]
    data.bad_images.share()
    run.logs.write("acc", "Test Accuracy:%.2f\n" % acc)
    run.logs.write_json("json", {"phase": "test", "test_acc": acc, **data.bad_images.epoch_record()})
    print(f"test accuracy of the best-validation nets: {acc:.2f}%", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
