"""DivideMix on WebVision 1.0 (first 50 classes of the Google subset) with Inception-ResNet-v2s from scratch.

    python Train_webvision.py --data_path ./webvision

Differences from CIFAR (the authors' Train_webvision.py; docs/paper.md): the division used in an epoch was made at
the END of the previous one; only the labeled rows enter the loss (Lx + penalty); warm-up is plain cross-entropy;
after each epoch the summed logits are scored top-1/top-5 on WebVision val and on ImageNet val of the same 50
classes.
"""
import sys
import time

import torch
import torch.optim as optim

from checkpointing import run_state
from cli import run_main
from dataloader_webvision import TRAIN_CROPS, WebVision
from distributed import (check_sync_bn, init_distributed, is_main_process, local_batch_size, make_shard, seed_process,
                         sync_buffers, world_size, wrap_ddp)
from dividemix import (DivideMixConfig, Precision, co_divide, co_train, co_warmup, evaluate, gmm_summary,
                       set_learning_rate)
from epochs import end_epoch
from flags import (NON_NEGATIVE, TRAIN_FLAGS, FlagParser, Range, add_engine_arguments, add_resume_argument,
                   add_tensorboard_argument, check_flags, defining_args)
from imagelist import add_loader_arguments
from InceptionResNetV2 import InceptionResNetV2
from run_folder import RunDir, run_config

LR_DECAY_EPOCH = 40
# The flags that may differ at --resume: where the files are (the training labels are checked by their digest),
# how long, where and how fast it runs. Every other flag defines the run: --resume refuses a checkpoint made with
# another value.
RESUME_MAY_CHANGE = ("num_epochs", "output_dir", "resume", "gpuid", "data_path", "id", "num_workers",
                     "max_bad_images", "amp", "channels_last", "sync_bn")
# The settings the run prints when it starts.
SHOWN_SETTINGS = ("batch_size", "lr", "alpha", "lambda_u", "p_threshold", "T", "seed", "num_class", "warm_up",
                  "image_size", "train_crop", "division")
# Allowed values of every numeric flag, checked before anything is read or written. Epoch 0 must be a warm-up
# epoch: the division a co-divide epoch trains on is made at the end of the epoch before.
FLAG_RANGES = {**TRAIN_FLAGS, "warm_up": Range(1, note="epoch 0 warms up: a division needs an epoch before it"),
               # below 107 pixels the last grid is 1x1, where BatchNorm cannot train on a last batch of one image
               "image_size": Range(107, note="Inception-ResNet-v2's last grid must be at least 2x2"),
               "num_workers": NON_NEGATIVE, "max_bad_images": NON_NEGATIVE}


def get_args_parser():
    """The original code's flags and defaults, plus the new ones."""
    p = FlagParser(description="DivideMix on WebVision")
    p.add_argument("--batch_size", default=32, type=int,
                   help="labeled and unlabeled batch size (warm-up uses twice this); the global batch under torchrun")
    p.add_argument("--lr", "--learning_rate", default=0.01, type=float, dest="lr",
                   help=f"initial learning rate, divided by 10 from epoch {LR_DECAY_EPOCH}")
    p.add_argument("--alpha", default=0.5, type=float, help="MixMatch's Beta(alpha, alpha)")
    p.add_argument("--lambda_u", default=0, type=float, help="weight of the unlabeled loss (unused: labeled rows only)")
    p.add_argument("--p_threshold", default=0.5, type=float, help="clean-probability threshold tau")
    p.add_argument("--T", default=0.5, type=float, help="sharpening temperature")
    p.add_argument("--num_epochs", default=80, type=int, help="last epoch (epochs 0..num_epochs are run)")
    p.add_argument("--id", default="webvision", type=str, help="file-name prefix of the run's logs and checkpoint")
    p.add_argument("--seed", default=123, type=int, help="one integer seeds Python, numpy and torch")
    p.add_argument("--gpuid", default=0, type=int, help="CUDA device when CUDA is available (ignored under torchrun)")
    p.add_argument("--num_class", default=50, type=int, help="the first N classes of WebVision's Google subset")
    p.add_argument("--data_path", default="./dataset/", type=str,
                   help="the WebVision folder: info/, google/, val_images_256/, imagenet/ (see docs/real_world.md)")
    p.add_argument("--warm_up", default=1, type=int, help="warm-up epochs")
    p.add_argument("--output_dir", default="./checkpoint", type=str, help="logs and checkpoint go here")
    add_resume_argument(p)
    add_tensorboard_argument(p)
    p.add_argument("--train_crop", default="random_resized", choices=TRAIN_CROPS,
                   help="random_resized (the original code now) or center (behind the published numbers)")
    p.add_argument("--image_size", default=299, type=int, help="crop size (resize = size * 320 / 299); paper: 299")
    add_loader_arguments(p)  # --num_workers, --max_bad_images
    add_engine_arguments(p)  # --amp, --channels_last, --division, --sync_bn
    return p


def create_model(num_class, device, precision):
    """Inception-ResNet-v2 from scratch on the training device."""
    net = InceptionResNetV2(num_classes=num_class).to(device)
    return net.to(memory_format=torch.channels_last) if precision.channels_last else net


def main(args):
    """Check the settings, open the run folder (lock, logs, checkpoint), then train in it."""
    check_flags(args, FLAG_RANGES)
    device = init_distributed(args.gpuid)
    local_batch_size(args.batch_size)
    log_names = {"acc": args.id + "_acc.txt", "stats": args.id + "_stats.txt", "json": args.id + "_log.jsonl"}
    with RunDir(args.output_dir, args.id, log_names, main=is_main_process(), tensorboard=args.tensorboard) as run:
        train(args, run, device)
    return 0


def train(args, run, device):
    """Set up, then run epochs start..num_epochs: train, test on both val sets, divide for the next epoch."""
    # ---- resume or start -----------------------------------------------------------------------------------
    defining = defining_args(args, RESUME_MAY_CHANGE)
    resume = run.open_checkpoint(args.resume, defining)
    sync_bn = check_sync_bn(args.sync_bn, device)
    precision = Precision.from_args(args, device)
    print("settings: " + ", ".join(f"{k}={getattr(args, k)}" for k in SHOWN_SETTINGS + ("amp",)), flush=True)
    seed_process(args.seed)
    shard = make_shard(args.seed)

    # ---- data and models -----------------------------------------------------------------------------------
    data = WebVision(args.data_path, args.num_class, args.batch_size, args.image_size, args.train_crop,
                     args.num_workers, device, args.max_bad_images, shard)
    run.check_labels(resume, defining, data.train_labels, f"{args.data_path}/info/train_filelist_google.txt")
    print(f"data: {len(data.train_paths)} training images, {len(data.val_paths)} WebVision val, "
          f"{len(data.imagenet_paths)} ImageNet val", flush=True)
    nets = [create_model(args.num_class, device, precision) for _ in range(2)]
    optimizers = [optim.SGD(n.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4) for n in nets]
    cfg = DivideMixConfig.from_args(args, precision, unlabeled_loss=False)
    probs = [None, None]  # per net: clean probability of every training image, made at the end of an epoch
    start_epoch = 0
    if resume is not None:
        start_epoch = run.restore(resume, nets, optimizers)
        probs = resume["probs"]
        data.bad_images.restore(resume.get("bad_images", []))
    else:
        run.begin(run_config("Train_webvision.py", args, device, len(data.train_paths),
                             labels_sha256=defining["labels_sha256"], world_size=world_size(), sync_bn=sync_bn))
    train_nets = wrap_ddp(nets, device, sync_bn)

    # ---- epochs --------------------------------------------------------------------------------------------
    # the noisy labels of the training list, when each class gets its own GMM
    classwise_labels = torch.as_tensor(data.train_labels).cpu().numpy() if args.division == "classwise" else None
    for epoch in range(start_epoch, args.num_epochs + 1):
        t_epoch = time.perf_counter()
        if shard is not None:
            shard.start_epoch(epoch)
        lr = [set_learning_rate(opt, args.lr, epoch, LR_DECAY_EPOCH) for opt in optimizers][0]
        if epoch < args.warm_up:
            phase = "warmup"
            records, timing = co_warmup(epoch, train_nets, optimizers, data.warmup_loader, device, False, precision)
        else:
            phase = "train"

            def make_loaders(k, pred, prob):
                """Loaders of net k's division; the original logs each division's size as it is used."""
                run.logs.write("stats", "Numer of labeled samples:%d \n" % pred.sum())
                return data.labeled_loader(pred, prob), data.unlabeled_loader(pred)

            records, timing = co_train(epoch, train_nets, optimizers, probs, make_loaders, cfg, device)
        sync_buffers(nets)

        t0 = time.perf_counter()
        web1, web5 = evaluate(nets, data.val_loader, device, ks=(1, 5), precision=precision)
        img1, img5 = evaluate(nets, data.imagenet_loader, device, ks=(1, 5), precision=precision)
        timing["test"] = time.perf_counter() - t0
        run.logs.write("acc", "Epoch:%d \t WebVision Acc: %.2f%% (%.2f%%) \t ImageNet Acc: %.2f%% (%.2f%%)\n"
                       % (epoch, web1, web5, img1, img5))

        # co-divide over the whole training list: the division for the next epoch
        divisions, divide_timing = co_divide(nets, data.eval_loader, cfg, device, labels=classwise_labels)
        timing.update(divide_timing)
        for k, (prob, _, gmm, stats) in enumerate(divisions):
            probs[k] = prob
            records[k].update(stats, gmm=gmm_summary(gmm))

        data.bad_images.share()
        shown = f"WebVision {web1:.2f}% ({web5:.2f}%)  ImageNet {img1:.2f}% ({img5:.2f}%)"
        end_epoch(run, epoch, phase, lr, t_epoch, shown, records, timing,
                  run_state(epoch, defining, args, nets, optimizers, probs=probs, bad_images=data.bad_images.state()),
                  scores={"webvision_top1": web1, "webvision_top5": web5, "imagenet_top1": img1,
                          "imagenet_top5": img5},
                  extra=data.bad_images.epoch_record(), details=f"  bad images {data.bad_images.count}", probs=probs)


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
