"""DivideMix on your own noisy data set: an ImageFolder tree, list files, or a named layout (Animal-10N, Food-101N).

    python Train_custom.py --data_path ./my_data                       # my_data/train/<class>/, my_data/test/<class>/
    python Train_custom.py --data_path ./animal10n --layout animal10n

The classes come from the data. Each epoch trains on the whole training set; the division it trains on was made at
the END of the epoch before (every epoch ends with each net's loss evaluation and GMM); warm-up is cross-entropy
with the confidence penalty. With a validation split each net keeps its best-validation weights, tested together at
the end; without one the pair is tested every epoch. At the end every training image's clean probabilities and
predicted label go to <id>_label_review.csv, the most suspicious label first. See docs/custom_data.md.
"""
import argparse
import csv
import io
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import torchvision

from backbone_weights import load_backbone
from checkpointing import atomic_write, run_state
from cli import UserError, run_main
import dataloader_custom
from distributed import (check_sync_bn, init_distributed, is_main_process, local_batch_size, make_shard, on_main,
                         seed_process, sync_buffers, world_size, wrap_ddp)
from dividemix import (DivideMixConfig, Precision, co_divide, co_train, co_warmup, division_stats, evaluate,
                       gmm_summary, predict, set_learning_rate)
from epochs import BestWeights, end_epoch
from flags import (NON_NEGATIVE, TRAIN_FLAGS, FlagParser, Range, add_engine_arguments, add_resume_argument,
                   add_tensorboard_argument, check_flags, defining_args, settings_line, value_text)
from imagelist import add_loader_arguments
from PreResNet import PreActResNet18
from run_folder import RunDir, run_config

TORCHVISION_ARCHS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights"}
ARCHS = ("preact_resnet18",) + tuple(TORCHVISION_ARCHS)
# The smallest input of each net: its last grid must be at least 2 x 2, or a batch of one image cannot be
# normalised by BatchNorm in training mode.
MIN_IMAGE_SIZE = {"preact_resnet18": 16, "resnet18": 64, "resnet34": 64, "resnet50": 64}
# The defaults of a net: torchvision's ResNets fine-tune ImageNet weights at 224 px; the PreAct ResNet-18 of the
# CIFAR script trains from scratch on small images.
ARCH_DEFAULTS = {"preact_resnet18": {"pretrained": "none", "image_size": 32}}
TORCHVISION_DEFAULTS = {"pretrained": "imagenet", "image_size": 224}
# Training recipes. finetune (pretrained nets): the paper's Clothing1M settings (labeled mixed rows only, a short
# warm-up); scratch: its CIFAR-10 settings (all mixed rows with lambda_u, ten warm-up epochs, 300 epochs).
RECIPES = {
    "finetune": {"batch_size": 32, "lr": 0.002, "weight_decay": 1e-3, "alpha": 0.5, "lambda_u": 0.0,
                 "unlabeled_loss": False, "warm_up": 1, "num_epochs": 80, "lr_decay_epoch": 40},
    "scratch": {"batch_size": 64, "lr": 0.02, "weight_decay": 5e-4, "alpha": 4.0, "lambda_u": 25.0,
                "unlabeled_loss": True, "warm_up": 10, "num_epochs": 300, "lr_decay_epoch": 150},
}
# What each layout sets before the net's and the recipe's defaults. Animal-10N: 64 x 64 images, about 8% noisy
# labels, so the paper's CIFAR-10 cell of low noise (20%: lambda_u 0). These are this project's choices by
# analogy with CIFAR-10; the settings later papers used for DivideMix on Animal-10N are not confirmed here.
LAYOUT_DEFAULTS = {
    "imagefolder": {"arch": "resnet50"}, "list": {"arch": "resnet50"}, "food101n": {"arch": "resnet50"},
    "animal10n": {"arch": "preact_resnet18", "image_size": 64, "lambda_u": 0.0},
}
# The flags that may differ at --resume: where the files are (the training labels and class names are checked),
# how long, where and how fast it runs. Every other flag defines the run: --resume refuses a checkpoint made with
# another value.
RESUME_MAY_CHANGE = ("num_epochs", "output_dir", "resume", "gpuid", "data_path", "train_list", "test_list", "val_list",
                     "classes", "food101_path", "id", "num_workers", "max_bad_images", "eval_batch_size", "amp",
                     "channels_last", "sync_bn")
# Allowed values of every numeric flag, checked before anything is read or written (the class count is no flag:
# it comes from the data). Epoch 0 must be a warm-up epoch: the division an epoch trains on is made at the end of
# the epoch before.
FLAG_RANGES = {**{k: v for k, v in TRAIN_FLAGS.items() if k != "num_class"},
               "warm_up": Range(1, note="epoch 0 warms up: a division needs an epoch before it"),
               "image_size": Range(16), "eval_batch_size": Range(1), "num_workers": NON_NEGATIVE,
               "max_bad_images": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "lr_decay_epoch": NON_NEGATIVE,
               "cache_limit_gb": NON_NEGATIVE}
REVIEW_COLUMNS = ("path", "given_label", "given_index", "clean_prob", "clean_prob_net1", "clean_prob_net2", "suspect",
                  "predicted_label", "predicted_index", "predicted_prob", "unreadable")


def recipe_text(name):
    """A recipe-made default as --help shows it: `32 fine-tuning, 64 from scratch` (fine-tuning: a pretrained net;
    from scratch: --pretrained none)."""
    shown = {kind: f"{v:g}" if isinstance(v, float) else value_text(v)
             for kind, v in ((kind, recipe[name]) for kind, recipe in RECIPES.items())}
    return f"{shown['finetune']} fine-tuning, {shown['scratch']} from scratch"


def get_args_parser():
    """The flags; those left at None take the layout's, the net's or the recipe's default (see resolve_settings)."""
    p = FlagParser(description="DivideMix on your own noisy data set")
    p.add_argument("--data_path", default="./data", help="the data set's folder (see --layout)")
    p.add_argument("--layout", default="auto", choices=dataloader_custom.LAYOUTS,
                   help="auto: list when --train_list is given, else imagefolder (train/<class>/, test/<class>/)")
    p.add_argument("--train_list", help="list layout: `relative/path label` lines, paths relative to --data_path "
                                        "(default: none; giving it makes --layout auto a list layout)")
    p.add_argument("--test_list", help="list layout: the test images (default: none; needed by the list layout)")
    p.add_argument("--val_list", help="list layout: validation images, best weights kept per net (default: none, "
                                      "no validation)")
    p.add_argument("--classes", help="list layout: class names, one a line, line i names label i (default: the "
                                     "labels of the training list)")
    p.add_argument("--food101_path", help="food101n layout: the food-101/ folder (default: beside Food-101N_release)")
    p.add_argument("--arch", choices=ARCHS, help="the net (default: preact_resnet18 for animal10n, else resnet50)")
    p.add_argument("--pretrained", help="'imagenet' (torchvision's IMAGENET1K_V1), a checkpoint file (for "
                                        "preact_resnet18: Pretrain_simclr.py's backbone; prefixes such as module. or "
                                        "encoder. are found), or 'none' "
                                        "(default: imagenet for the ResNets, none for preact_resnet18)")
    p.add_argument("--image_size", type=int, help="training and test size (default: 64 for animal10n, else 224 for "
                                                  "the ResNets and 32 for preact_resnet18)")
    p.add_argument("--augment", choices=dataloader_custom.AUGMENTS,
                   help="crop: random crop of the zero-padded image + flip; resized_crop: random-resized crop + "
                        f"flip (default: crop up to {dataloader_custom.SMALL_IMAGE} px, else resized_crop)")
    p.add_argument("--cache_limit_gb", default=4.0, type=float,
                   help="decode the images once into a uint8 tensor on the training device when they take at most "
                        "this much (crop augmentation only; 0: always stream from the files)")
    p.add_argument("--batch_size", type=int,
                   help="labeled and unlabeled batch size; the global batch under torchrun (default: "
                        f"{recipe_text('batch_size')})")
    p.add_argument("--eval_batch_size", type=int,
                   help="batch of loss evaluation and test, per process (default: 2 x --batch_size)")
    p.add_argument("--lr", "--learning_rate", type=float, dest="lr",
                   help=f"initial learning rate (default: {recipe_text('lr')})")
    p.add_argument("--lr_decay_epoch", type=int,
                   help=f"lr / 10 from this epoch (default: {recipe_text('lr_decay_epoch')})")
    p.add_argument("--weight_decay", type=float, help=f"SGD's weight decay (default: {recipe_text('weight_decay')})")
    p.add_argument("--alpha", type=float, help=f"MixMatch's Beta(alpha, alpha) (default: {recipe_text('alpha')})")
    p.add_argument("--lambda_u", type=float,
                   help=f"weight of the unlabeled loss (default: {recipe_text('lambda_u')}; animal10n: 0)")
    p.add_argument("--unlabeled_loss", action=argparse.BooleanOptionalAction, default=None,
                   help="train on all mixed rows with lambda_u * Lu (CIFAR) instead of the labeled rows only "
                        f"(Clothing1M) (default: {recipe_text('unlabeled_loss')})")
    p.add_argument("--p_threshold", default=0.5, type=float, help="clean-probability threshold tau")
    p.add_argument("--T", default=0.5, type=float, help="sharpening temperature")
    p.add_argument("--num_epochs", type=int,
                   help=f"last epoch, epochs 0..num_epochs are run (default: {recipe_text('num_epochs')})")
    p.add_argument("--warm_up", type=int, help=f"warm-up epochs (default: {recipe_text('warm_up')})")
    p.add_argument("--warmup_penalty", action=argparse.BooleanOptionalAction, default=True,
                   help="the confidence penalty in warm-up (real label noise is asymmetric)")
    p.add_argument("--id", help="file-name prefix of the run (default: the layout's name, animal10n or food101n; "
                                "custom for imagefolder and list)")
    p.add_argument("--seed", default=123, type=int, help="one integer seeds Python, numpy and torch")
    p.add_argument("--gpuid", default=0, type=int, help="CUDA device when CUDA is available (ignored under torchrun)")
    p.add_argument("--output_dir", default="./checkpoint", type=str,
                   help="logs, weights, checkpoint and label review go here")
    add_resume_argument(p)
    add_tensorboard_argument(p)
    add_loader_arguments(p)  # --num_workers, --max_bad_images
    add_engine_arguments(p)  # --amp, --channels_last, --division, --sync_bn
    return p


def resolve_settings(args):
    """Check the flags and fill those left at None; return {name: where its value came from}."""
    check_flags(args, FLAG_RANGES)
    sources = {"layout": "flag" if args.layout != "auto" else f"auto: {'' if args.train_list else 'no '}--train_list"}
    args.layout = dataloader_custom.resolve_layout(args.layout, args.train_list)
    layout = LAYOUT_DEFAULTS[args.layout]

    def fill(name, value, source):
        """Set a flag left at None, and note where its value came from."""
        if getattr(args, name) is None:
            setattr(args, name, value)
            sources[name] = source
        else:
            sources[name] = "flag"

    fill("arch", layout["arch"], f"{args.layout} default")
    net = ARCH_DEFAULTS.get(args.arch, TORCHVISION_DEFAULTS)
    fill("pretrained", net["pretrained"], f"{args.arch} default")
    if "image_size" in layout:
        fill("image_size", layout["image_size"], f"{args.layout} images")
    else:
        fill("image_size", net["image_size"], f"{args.arch} default")
    fill("augment", dataloader_custom.default_augment(args.image_size), f"{args.image_size} px")
    recipe = "scratch" if args.pretrained == "none" else "finetune"
    for name, value in RECIPES[recipe].items():
        if name in layout:
            fill(name, layout[name], f"{args.layout} default")
        else:
            fill(name, value, f"{recipe} recipe")
    fill("eval_batch_size", 2 * args.batch_size, "2 x batch_size")
    fill("id", "custom" if args.layout in ("imagefolder", "list") else args.layout, f"{args.layout} default")
    check_flags(args, FLAG_RANGES)
    if args.image_size < MIN_IMAGE_SIZE[args.arch]:
        raise UserError(f"--image_size {args.image_size} is too small for {args.arch}: give at least "
                        f"{MIN_IMAGE_SIZE[args.arch]} (its last grid must be 2 x 2 or more)")
    if args.lambda_u > 0 and not args.unlabeled_loss and sources["lambda_u"] != "flag":
        args.lambda_u, sources["lambda_u"] = 0.0, "unused without --unlabeled_loss"
    if args.lambda_u > 0 and not args.unlabeled_loss:
        raise UserError(f"--lambda_u {args.lambda_u:g} has no effect without the unlabeled loss: add "
                        "--unlabeled_loss, or drop --lambda_u")
    if args.arch == "preact_resnet18" and args.pretrained == "imagenet":
        raise UserError("preact_resnet18 has no ImageNet weights: pass --pretrained none (or a state-dict file of "
                        "it), or choose --arch resnet18 / resnet34 / resnet50")
    return sources


# ----------------------------------------------------------------------------- nets

def _torchvision_net(arch, pretrained, name=None):
    """A torchvision ResNet with ImageNet weights, weights from a file, or none."""
    builder = getattr(torchvision.models, arch)
    weights = getattr(torchvision.models, TORCHVISION_ARCHS[arch]).IMAGENET1K_V1
    if pretrained != "imagenet":
        net = builder(weights=None)
        if pretrained != "none":
            load_backbone(net, pretrained, "fc", arch, name)
        return net
    try:
        return builder(weights=weights)
    except Exception as exc:
        file_name = os.path.basename(weights.url)
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
        raise UserError(f"cannot load the ImageNet weights of {arch} ({type(exc).__name__}): place {file_name} at "
                        f"{cache}, or pass --pretrained PATH to a state dict, or --pretrained none") from None


def create_model(arch, pretrained, num_class, device, precision, name=None):
    """The chosen net with a new num_class-way head, on the training device, in the layout of `precision`; name:
    the net as the line saying what a --pretrained file gave it calls it."""
    if arch == "preact_resnet18":
        net = PreActResNet18(num_class)
        if pretrained != "none":
            load_backbone(net, pretrained, "linear", arch, name)
    else:
        net = _torchvision_net(arch, pretrained, name)
        net.fc = nn.Linear(net.fc.in_features, num_class)
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if precision.channels_last else net


# ----------------------------------------------------------------------------- the label review

def shown_path(path, data_path):
    """A training image's path as the review file shows it: relative to --data_path when inside it."""
    rel = os.path.relpath(path, data_path)
    return path if rel.startswith(os.pardir) else rel


def review_rows(data, probs, logits, p_threshold, unreadable, data_path):
    """The review file's rows: every training image, the lowest mean clean probability (most suspicious) first."""
    classes = data.classes
    prob1, prob2 = (np.asarray(p, dtype=np.float64) for p in probs)
    clean = (prob1 + prob2) / 2
    soft = torch.softmax(logits.float(), dim=1)
    confidence, predicted = (t.numpy() for t in soft.max(dim=1))
    verified = {}
    if data.verified is not None:
        verified = dict(zip(data.verified[0].tolist(), data.verified[1].tolist()))
    rows = []
    for i in np.argsort(clean, kind="stable").tolist():
        path, given = data.train.paths[i], int(data.train.labels[i])
        row = [shown_path(path, data_path), classes[given], given, f"{clean[i]:.6f}", f"{prob1[i]:.6f}",
               f"{prob2[i]:.6f}", int(clean[i] <= p_threshold), classes[predicted[i]], int(predicted[i]),
               f"{confidence[i]:.6f}", int(path in unreadable)]
        if data.verified is not None:
            row.append("" if i not in verified else int(verified[i]))
        rows.append(row)
    return rows


def write_review(path, data, probs, logits, p_threshold, unreadable, data_path):
    """Write the review CSV atomically (a stop mid-write leaves the previous file or none)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(REVIEW_COLUMNS + (("verified_clean",) if data.verified is not None else ()))
    writer.writerows(review_rows(data, probs, logits, p_threshold, unreadable, data_path))
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


# ----------------------------------------------------------------------------- the run

def main(args):
    """Check the settings and the data, open the run folder (lock, logs, checkpoint), then train in it."""
    sources = resolve_settings(args)
    device = init_distributed(args.gpuid)
    local_batch_size(args.batch_size)
    # rank 0 reads the lists and checks every file; errors in the data stop the run before anything is written
    data = on_main(dataloader_custom.read_layout, args.layout, args.data_path, args.train_list, args.test_list,
                   args.val_list, args.classes, args.food101_path)
    args.num_class = len(data.classes)
    log_names = {"acc": args.id + "_acc.txt", "json": args.id + "_log.jsonl"}
    with RunDir(args.output_dir, args.id, log_names, carried=("_net1.pth.tar", "_net2.pth.tar"),
                main=is_main_process(), tensorboard=args.tensorboard) as run:
        train(args, run, data, sources, device)
    return 0


def train(args, run, data, sources, device):
    """Set up, run epochs start..num_epochs (train, evaluate, divide for the next epoch), then test and review."""
    # ---- resume or start -----------------------------------------------------------------------------------
    defining = defining_args(args, RESUME_MAY_CHANGE)
    resume = run.open_checkpoint(args.resume, defining)
    run.check_labels(resume, defining, data.train.labels, data.train.source)
    if resume is not None and resume.get("classes", data.classes) != data.classes:
        raise UserError(f"--resume: the classes of the data ({len(data.classes)}: {', '.join(data.classes[:5])} ...) "
                        "differ from those the checkpoint was trained on: pass the data the run was made with, or "
                        "start a new --output_dir")
    sync_bn = check_sync_bn(args.sync_bn, device)
    precision = Precision.from_args(args, device, sources)
    print(settings_line(args, sources), flush=True)
    seed_process(args.seed)
    shard = make_shard(args.seed)

    # ---- data and models -----------------------------------------------------------------------------------
    cached, how = dataloader_custom.cache_decision(data, args.image_size, args.augment, args.cache_limit_gb)
    known_bad = resume.get("bad_images", []) if resume is not None else []
    common = dict(max_bad_images=args.max_bad_images, shard=shard, known_bad=known_bad)
    if cached:
        feed = dataloader_custom.CachedData(data, args.image_size, args.batch_size, args.eval_batch_size,
                                            args.num_workers, device, **common)
    else:
        feed = dataloader_custom.StreamData(data, args.image_size, args.augment, args.batch_size,
                                            args.eval_batch_size, args.num_workers, device, **common)
    val_text = f", {len(data.val)} val" if data.val is not None else ""
    verified = data.verified
    print(f"data: {data.name} layout, {len(data.classes)} classes, {len(data.train)} training images{val_text}, "
          f"{len(data.test)} test; {how} on {device}"
          + (f"; {len(verified[0])} with verification labels" if verified is not None else ""), flush=True)
    nets = [create_model(args.arch, args.pretrained, args.num_class, device, precision, f"net{k}") for k in (1, 2)]
    optimizers = [optim.SGD(n.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay) for n in nets]
    cfg = DivideMixConfig.from_args(args, precision, unlabeled_loss=args.unlabeled_loss)
    probs = [None, None]  # per net: clean probability of every training image, made at the end of an epoch
    best = BestWeights(run, resume["best"] if resume is not None else None)
    start_epoch = 0
    if resume is not None:
        start_epoch = run.restore(resume, nets, optimizers)
        probs = resume["probs"]
    else:
        run.begin(run_config("Train_custom.py", args, device, len(data.train), sources,
                             labels_sha256=defining["labels_sha256"], classes=data.classes, cached=cached,
                             num_val=len(data.val) if data.val is not None else 0, num_test=len(data.test),
                             world_size=world_size(), sync_bn=sync_bn))
    train_nets = wrap_ddp(nets, device, sync_bn)

    # ---- epochs --------------------------------------------------------------------------------------------
    # the noisy labels of the training set, when each class gets its own GMM
    classwise_labels = torch.as_tensor(feed.train_labels).cpu().numpy() if args.division == "classwise" else None
    for epoch in range(start_epoch, args.num_epochs + 1):
        t_epoch = time.perf_counter()
        if shard is not None:
            shard.start_epoch(epoch)
        lr = [set_learning_rate(opt, args.lr, epoch, args.lr_decay_epoch) for opt in optimizers][0]
        if epoch < args.warm_up:
            phase = "warmup"
            records, timing = co_warmup(epoch, train_nets, optimizers, feed.warmup_loader, device,
                                        args.warmup_penalty, precision)
        else:
            phase = "train"

            def make_loaders(k, pred, prob):
                """Loaders of net k's division."""
                return feed.labeled_loader(pred, prob), feed.unlabeled_loader(pred)

            records, timing = co_train(epoch, train_nets, optimizers, probs, make_loaders, cfg, device)
        sync_buffers(nets)

        # with a validation split each net keeps its best weights; without one the pair is tested every epoch
        t0 = time.perf_counter()
        if feed.val_loader is not None:
            accs = [evaluate([net], feed.val_loader, device, precision=precision)[0] for net in nets]
            best.update(nets, accs)
            run.logs.write("acc", "Validation Epoch:%d      Acc1:%.2f  Acc2:%.2f\n" % (epoch, accs[0], accs[1]))
            scores = {"val_acc1": accs[0], "val_acc2": accs[1]}
            shown = f"val {accs[0]:.2f}% / {accs[1]:.2f}%"
        else:
            acc = evaluate(nets, feed.test_loader, device, precision=precision)[0]
            run.logs.write("acc", "Epoch:%d   Accuracy:%.2f\n" % (epoch, acc))
            scores = {"test_acc": acc}
            shown = f"test {acc:.2f}%"
        timing["eval"] = time.perf_counter() - t0

        # co-divide over the whole training set: the division for the next epoch
        divisions, divide_timing = co_divide(nets, feed.eval_loader, cfg, device, labels=classwise_labels)
        timing.update(divide_timing)
        for k, (prob, _, gmm, stats) in enumerate(divisions):
            probs[k] = prob
            records[k].update(stats, gmm=gmm_summary(gmm))
            if verified is not None:  # how well the division finds the hand-checked labels
                records[k]["verified"] = division_stats(prob[verified[0]], args.p_threshold, verified[1])

        feed.bad_images.share()
        auc = ""
        if verified is not None:
            auc = "  verified AUC %.3f/%.3f" % (records[0]["verified"]["auc"], records[1]["verified"]["auc"])
        end_epoch(run, epoch, phase, lr, t_epoch, shown, records, timing,
                  run_state(epoch, defining, args, nets, optimizers, probs=probs, best=best.best,
                            classes=data.classes, bad_images=feed.bad_images.state()),
                  scores=scores, extra=feed.bad_images.epoch_record(),
                  details=f"  labeled {records[0]['labeled']}/{records[1]['labeled']} of {len(data.train)} for the "
                          f"next epoch{auc}  bad images {feed.bad_images.count}", probs=probs)

    # ---- the label review (last division, last nets), then the test ----------------------------------------
    logits, _ = predict(nets, feed.eval_loader, device, precision)
    review = run.path("_label_review.csv")
    if run.main:
        write_review(review, data, probs, logits, args.p_threshold, set(feed.bad_images.found), args.data_path)
    suspects = int(((np.asarray(probs[0]) + np.asarray(probs[1])) / 2 <= args.p_threshold).sum())
    print(f"label review: {review} ({suspects} of {len(data.train)} labels suspected, most suspicious first)",
          flush=True)
    if feed.val_loader is not None:  # the two best-validation nets together
        best.load_into(nets, device)
    acc = evaluate(nets, feed.test_loader, device, precision=precision)[0]
    feed.bad_images.share()
    run.logs.write("acc", "Test Accuracy:%.2f\n" % acc)
    run.logs.write_json("json", {"phase": "test", "test_acc": acc, "suspected": suspects,
                                 **feed.bad_images.epoch_record()})
    which = "best-validation nets" if feed.val_loader is not None else "final nets"
    print(f"test accuracy of the {which}: {acc:.2f}%", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
