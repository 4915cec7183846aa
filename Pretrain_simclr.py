"""SimCLR pre-training without labels: the self-supervised start of C2D and Manifold DivideMix.

    python Pretrain_simclr.py --data_path ./cifar-10                         # CIFAR-10's training images
    python Pretrain_simclr.py --dataset custom --data_path ./my_data        # any layout of Train_custom.py
    python Train_cifar.py --data_path ./cifar-10 --r 0.9 --pretrained checkpoint/simclr_cifar10_backbone.pth

The training scripts' own PreAct ResNet-18 learns from two augmented views of every training image (NT-Xent over
the global batch, negatives gathered from every process under torchrun); its backbone, without the projection head,
is written every epoch to <prefix>_backbone.pth for --pretrained. Each epoch logs the loss and the kNN accuracy of
the backbone's features on the test set (the training labels vote: a quick measure of the embedding, no training
on labels). See docs/pretraining.md.
"""
import sys
import time
from collections import namedtuple

import torch
import torch.optim as optim

from checkpointing import atomic_save, run_state
import cifar_files
from cli import UserError, run_main
import dataloader_cifar
import dataloader_custom
from device_batches import Batches, normalise
from distributed import (check_sync_bn, init_distributed, is_main_process, local_batch_size, make_shard, on_main,
                         seed_process, sync_buffers, world_size, wrap_ddp)
from dividemix import Precision, embed
from flags import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SEED, FlagParser, Range, add_engine_arguments,
                   add_resume_argument, add_tensorboard_argument, check_flags, defining_args, settings_line)
from imagelist import BadImages, add_loader_arguments
from presets import KNN_MONITOR, NUM_CLASSES, SIMCLR_RECIPE, SIMCLR_SOURCE
from PreResNet import PreActResNet18
from run_folder import RunDir, run_config
from simclr import SimCLRConfig, SimCLRNet, knn_accuracy, pretrain_epoch
from utils import json_safe

DATASETS = ("cifar10", "cifar100", "custom")
# The flags that may differ at --resume: where the files are, where and how fast it runs. Every other flag defines
# the run (the epochs too: the cosine schedule spans them).
RESUME_MAY_CHANGE = ("output_dir", "resume", "gpuid", "download", "data_path", "train_list", "test_list", "classes",
                     "food101_path", "num_workers", "max_bad_images", "eval_batch_size", "amp", "channels_last",
                     "sync_bn")
# The recipe's flags (None: the recipe's value) and the rest, checked before anything is read or written.
RECIPE_FLAGS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "temperature", "warm_epochs")
FLAG_RANGES = {"epochs": AT_LEAST_ONE, "batch_size": Range(2, note="NT-Xent needs two images"), "lr": POSITIVE,
               "momentum": Range(0, 1), "weight_decay": NON_NEGATIVE, "temperature": POSITIVE,
               "warm_epochs": NON_NEGATIVE, "crop_min_scale": Range(0, 1, low_open=True), "seed": SEED,
               "gpuid": NON_NEGATIVE, "net_width": AT_LEAST_ONE, "image_size": Range(16), "knn_k": AT_LEAST_ONE,
               "eval_batch_size": AT_LEAST_ONE, "num_workers": NON_NEGATIVE, "max_bad_images": NON_NEGATIVE}


def get_args_parser():
    """The flags; the recipe's are None until resolve_settings fills them."""
    p = FlagParser(description="SimCLR pre-training of the training scripts' PreAct ResNet-18, without labels")
    p.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="cifar10 / cifar100: CIFAR's python files in --data_path; custom: a layout of "
                        "Train_custom.py (see --layout)")
    p.add_argument("--data_path", default="./cifar-10", help="the data set's folder")
    p.add_argument("--download", action="store_true", help="fetch CIFAR into --data_path if it is absent")
    p.add_argument("--layout", default="auto", choices=dataloader_custom.LAYOUTS,
                   help="--dataset custom: as Train_custom.py's (auto: list when --train_list is given, else "
                        "imagefolder)")
    p.add_argument("--train_list", help="list layout: `relative/path label` lines (default: none)")
    p.add_argument("--test_list", help="list layout: the test images of the kNN measure (default: none)")
    p.add_argument("--classes", help="list layout: class names, one a line (default: the labels of the lists)")
    p.add_argument("--food101_path", help="food101n layout: the food-101/ folder (default: beside Food-101N_release)")
    p.add_argument("--image_size", type=int,
                   help="--dataset custom: the size images are decoded to and views cropped at (default: 64 for "
                        "animal10n, else 32; CIFAR: 32)")
    p.add_argument("--net_width", default=64, type=int,
                   help="channels of the PreAct ResNet-18's first stage (64: the training scripts' network)")
    p.add_argument("--epochs", type=int, help=f"epochs; the cosine schedule spans them (default: "
                                              f"{SIMCLR_RECIPE['epochs']})")
    p.add_argument("--batch_size", type=int,
                   help=f"images per step, two views each; the global batch under torchrun (default: "
                        f"{SIMCLR_RECIPE['batch_size']})")
    p.add_argument("--lr", "--learning_rate", type=float, dest="lr",
                   help=f"peak learning rate of the cosine schedule (default: {SIMCLR_RECIPE['lr']})")
    p.add_argument("--momentum", type=float, help=f"SGD's momentum (default: {SIMCLR_RECIPE['momentum']})")
    p.add_argument("--weight_decay", type=float, help=f"SGD's weight decay (default: {SIMCLR_RECIPE['weight_decay']})")
    p.add_argument("--temperature", type=float, help=f"NT-Xent's temperature (default: {SIMCLR_RECIPE['temperature']})")
    p.add_argument("--warm_epochs", type=int,
                   help=f"epochs of linear warm-up from {SIMCLR_RECIPE['warmup_from']} (default: "
                        f"{SIMCLR_RECIPE['warm_epochs']})")
    p.add_argument("--crop_min_scale", default=SIMCLR_RECIPE["crop_scale"][0], type=float,
                   help="smallest area fraction of the random resized crop")
    p.add_argument("--knn_k", default=KNN_MONITOR["k"], type=int, help="neighbours of the kNN accuracy")
    p.add_argument("--eval_batch_size", default=1024, type=int,
                   help="batch size of the kNN measure's embedding (no effect on results)")
    p.add_argument("--id", help="file-name prefix of the run (default: simclr_<dataset>, or simclr_<layout> for "
                                "custom data)")
    p.add_argument("--seed", default=123, type=int, help="one integer seeds Python, numpy and torch")
    p.add_argument("--gpuid", default=0, type=int, help="CUDA device when CUDA is available (ignored under torchrun)")
    p.add_argument("--output_dir", default="./checkpoint", help="logs, checkpoint and the backbone go here")
    add_resume_argument(p)
    add_tensorboard_argument(p)
    add_loader_arguments(p)  # --num_workers, --max_bad_images (custom data)
    add_engine_arguments(p, division=False)  # --amp, --channels_last, --sync_bn
    return p


def resolve_settings(args):
    """Check the flags and fill those left at None; return {name: where its value came from}."""
    check_flags(args, FLAG_RANGES)
    sources = {}
    for name in RECIPE_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, SIMCLR_RECIPE[name])
            sources[name] = SIMCLR_SOURCE
        else:
            sources[name] = "flag"
    sources["crop_min_scale"] = "flag" if args.crop_min_scale != SIMCLR_RECIPE["crop_scale"][0] else SIMCLR_SOURCE
    custom = args.dataset == "custom"
    if custom:
        sources["layout"] = "flag" if args.layout != "auto" else "auto"
        args.layout = dataloader_custom.resolve_layout(args.layout, args.train_list)
    elif args.layout != "auto" or args.train_list or args.test_list or args.classes or args.food101_path:
        raise UserError(f"--layout and the list flags belong to --dataset custom, not {args.dataset}: drop them, or "
                        "pass --dataset custom")
    if args.image_size is None:
        args.image_size = 64 if custom and args.layout == "animal10n" else 32
        sources["image_size"] = f"{args.layout} default" if custom else "CIFAR's images"
    elif not custom and args.image_size != 32:
        raise UserError(f"--image_size {args.image_size}: CIFAR's images are 32 px: drop the flag")
    else:
        sources["image_size"] = "flag"
    if args.id is None:
        args.id = f"simclr_{args.layout if custom else args.dataset}"
    check_flags(args, FLAG_RANGES)
    return sources


# The images as uint8 tensors N x 3 x S x S with their labels (the kNN measure's only use of them), the class
# count, the normalisation of the training script that loads the backbone, and where the data came from.
PretrainData = namedtuple("PretrainData", "train_x train_y test_x test_y num_class mean std where")


def read_data(args):
    """The training and test images of CIFAR's files or of a Train_custom.py layout (decoded at --image_size)."""
    if args.dataset != "custom":
        on_main(cifar_files.ensure_data, args.data_path, args.dataset, args.download)
        train_x, train_y, test_x, test_y = (torch.as_tensor(a) for a in cifar_files.read_cifar(args.data_path,
                                                                                             args.dataset))
        return PretrainData(train_x, train_y, test_x, test_y, NUM_CLASSES[args.dataset],
                            *dataloader_cifar.MEAN_STD[args.dataset], f"{args.dataset} in {args.data_path}")
    data = on_main(dataloader_custom.read_layout, args.layout, args.data_path, args.train_list, args.test_list, None,
                   args.classes, args.food101_path)
    bad = BadImages(args.max_bad_images)
    (train_x, train_y), (test_x, test_y) = (dataloader_custom.decode_split(split, args.image_size, args.num_workers,
                                                                           bad, drop_bad)
                                            for split, drop_bad in ((data.train, False), (data.test, True)))
    return PretrainData(train_x, train_y, test_x, test_y, len(data.classes), dataloader_custom.MEAN,
                        dataloader_custom.STD, f"{data.name} layout in {args.data_path}")


def main(args):
    """Check the settings, open the run folder (lock, logs, checkpoint), then pre-train in it."""
    sources = resolve_settings(args)
    device = init_distributed(args.gpuid)
    local_batch_size(args.batch_size)
    log_names = {"acc": args.id + "_acc.txt", "json": args.id + "_log.jsonl"}
    with RunDir(args.output_dir, args.id, log_names, carried=("_backbone.pth",), main=is_main_process(),
                tensorboard=args.tensorboard) as run:
        pretrain(args, run, sources, device)
    return 0


def pretrain(args, run, sources, device):
    """Set up, then run epochs start..epochs-1: SimCLR, the kNN measure, log, checkpoint, backbone file."""
    # ---- resume or start -----------------------------------------------------------------------------------
    defining = defining_args(args, RESUME_MAY_CHANGE)
    resume = run.open_checkpoint(args.resume, defining)
    sync_bn = check_sync_bn(args.sync_bn, device)
    precision = Precision.from_args(args, device, sources)
    print(settings_line(args, sources), flush=True)
    seed_process(args.seed)

    # ---- data ----------------------------------------------------------------------------------------------
    data = read_data(args)
    train_y, test_y, where = data.train_y, data.test_y, data.where
    run.check_labels(resume, defining, train_y.numpy(), where)
    if len(data.train_x) < 2:
        raise UserError(f"{where} gives {len(data.train_x)} training image: NT-Xent needs at least two")
    train_x, test_x = data.train_x.to(device), data.test_x.to(device)
    mean_t, std_t = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (data.mean, data.std))
    shard = make_shard(args.seed)
    views = Batches(lambda i: train_x[i], torch.arange(len(train_x), device=device), args.batch_size, True, shard)

    def in_order(images, labels):
        """Normalised images with their labels, in order (each rank its span): the kNN measure's input."""
        make = lambda i: (normalise(images[i], mean_t, std_t), labels[i])  # noqa: E731
        return Batches(make, torch.arange(len(images), device=device), args.eval_batch_size, False, shard)

    train_eval, test_eval = in_order(train_x, train_y), in_order(test_x, test_y)
    print(f"data: {len(train_x)} training images (labels unused but by the kNN measure), {len(test_x)} test images "
          f"from {where}, {args.image_size} px, on {device}", flush=True)

    # ---- model ---------------------------------------------------------------------------------------------
    backbone = PreActResNet18(data.num_class, width=args.net_width)
    model = SimCLRNet(backbone).to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    cfg = SimCLRConfig.from_args(args, precision)
    start_epoch = 0
    if resume is not None:
        start_epoch = run.restore(resume, [model], [optimizer])
    else:
        run.begin(run_config("Pretrain_simclr.py", args, device, len(train_x), sources,
                             labels_sha256=defining["labels_sha256"], world_size=world_size(), sync_bn=sync_bn,
                             backbone={"arch": "preact_resnet18", "net_width": args.net_width}))
    train_model = wrap_ddp([model], device, sync_bn)[0]
    backbone_path = run.path("_backbone.pth")

    # ---- epochs --------------------------------------------------------------------------------------------
    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.perf_counter()
        if shard is not None:
            shard.start_epoch(epoch)
        t0 = time.perf_counter()
        record = pretrain_epoch(epoch, train_model, optimizer, views, cfg, device, mean_t, std_t)
        timing = {"train": time.perf_counter() - t0}
        sync_buffers([model])
        t0 = time.perf_counter()
        knn = knn_accuracy(embed(backbone, train_eval, device, precision), train_y,
                           embed(backbone, test_eval, device, precision), test_y, data.num_class, k=args.knn_k)
        timing["knn"] = time.perf_counter() - t0
        if run.main:  # the backbone alone, the file --pretrained takes (atomic: a stop leaves the last whole one)
            atomic_save({"state_dict": backbone.state_dict(), "arch": "preact_resnet18", "net_width": args.net_width,
                         "image_size": args.image_size, "epoch": epoch, "knn_acc": knn}, backbone_path)
        seconds = time.perf_counter() - t_epoch
        run.logs.write("acc", "Epoch:%d   kNN Accuracy:%.2f   Loss:%.4f\n" % (epoch, knn, record["loss"]))
        run.record_epoch(json_safe({"epoch": epoch, "phase": "simclr", "lr": record["lr"], "loss": record["loss"],
                                    "knn_acc": knn, "iterations": record["iterations"], "seconds": seconds,
                                    "time": timing}))
        print(f"epoch {epoch:3d} simclr loss {record['loss']:.4f}  kNN {knn:6.2f}%  lr {record['lr']:.4g}  "
              f"{seconds:.1f}s", flush=True)
        run.save(run_state(epoch, defining, args, [model], [optimizer]))
    if run.main:
        print(f"backbone: {backbone_path} (pass it to --pretrained)", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
