"""DivideMix on CIFAR-10/100 with synthetic label noise.

    python Train_cifar.py --data_path ./cifar-10 --r 0.5 --noise_mode sym

Two PreAct ResNet-18s are warmed up on the noisy labels; then every epoch each net's per-sample losses are
split by a two-component GMM into a labeled (clean) and an unlabeled (noisy) set for the OTHER net
(co-divide), which trains on them with MixMatch, label co-refinement and co-guessing.
"""
import os
import sys
import time

import numpy as np
import torch
import torch.optim as optim

from backbone_weights import load_backbone
from checkpointing import atomic_write, run_state
import cifar_files
from cli import UserError, run_main
import dataloader_cifar
from distributed import (broadcast_from_main, check_sync_bn, init_distributed, is_main_process, local_batch_size,
                         make_shard, on_main, seed_process, sync_buffers, world_size, wrap_ddp)
from dividemix import (DivideMixConfig, Precision, co_divide, co_train, co_warmup, embed, evaluate, gmm_summary,
                       knn_scores, ood_removal, set_learning_rate)
from epochs import end_epoch
from flags import (TRAIN_FLAGS, FlagParser, Range, add_engine_arguments, add_resume_argument,
                   add_tensorboard_argument, check_flags, defining_args, settings_line)
import noise
from PreResNet import ResNet18
from presets import (CIFARN_MODES, CIFARN_PRESET, NUM_CLASSES, ORIGINAL_DEFAULTS, WARM_UP, run_prefix,
                     setting_preset)
from run_folder import RunDir, run_config
from rundirs import LOSSES_SUFFIX, loss_snapshot_name

LR_DECAY_EPOCH = 150
# The flags that may differ at --resume: where the files are (the labels and replaced images are checked by their
# digest), how long, where and how fast it runs. Every other flag defines the run: --resume refuses a checkpoint
# made with another value.
RESUME_MAY_CHANGE = ("num_epochs", "output_dir", "resume", "gpuid", "download", "data_path", "noise_file",
                     "cifarn_file", "ood_path", "ood_file", "id", "eval_batch_size", "save_loss_every", "compile",
                     "amp", "channels_last", "sync_bn")
# Allowed values of every numeric flag, checked before anything is read or written. A warm_up beyond num_epochs
# is allowed: the run is then warm-up only.
FLAG_RANGES = {**TRAIN_FLAGS, **noise.NOISE_FLAGS, "eval_batch_size": Range(1),
               "save_loss_every": Range(0, note="0: never"), "loss_window": Range(1), "ood_k": Range(1),
               "ood_remove": Range(0, 1, note="a fraction of the training images, below 1"), "ood_interval": Range(1),
               "ood_remove_step": Range(0, 1),
               "lambda_e": Range(0), "net_width": Range(1)}


def get_args_parser():
    """Command-line arguments: the original code's flags and defaults, plus the new ones."""
    p = FlagParser(description="DivideMix on CIFAR-10/100", add_help=True)
    p.add_argument("--batch_size", default=64, type=int,
                   help="labeled and unlabeled batch size (warm-up uses twice this); the global batch under torchrun")
    p.add_argument("--lr", "--learning_rate", default=0.02, type=float, dest="lr",
                   help=f"initial learning rate, divided by 10 from epoch {LR_DECAY_EPOCH}")
    p.add_argument("--alpha", default=4, type=float, help="MixMatch's Beta(alpha, alpha)")
    p.add_argument("--lambda_u", default=None, type=float,
                   help="weight of the unlabeled loss (default: the paper's value for its own settings, "
                        f"{CIFARN_PRESET['lambda_u']} for CIFAR-N, else the original code's "
                        f"{ORIGINAL_DEFAULTS['lambda_u']})")
    p.add_argument("--p_threshold", default=None, type=float,
                   help="clean-probability threshold tau (default: the paper's value for its own settings, "
                        f"{CIFARN_PRESET['p_threshold']} for CIFAR-N, else the original code's "
                        f"{ORIGINAL_DEFAULTS['p_threshold']})")
    p.add_argument("--T", default=0.5, type=float, help="sharpening temperature")
    p.add_argument("--num_epochs", default=300, type=int, help="last epoch (epochs 0..num_epochs are run)")
    p.add_argument("--id", default="", help="kept from the original for scripts that pass it; unused")
    noise.add_noise_arguments(p)  # --dataset, --data_path, --r, --noise_mode, --seed, noise files
    p.add_argument("--gpuid", default=0, type=int, help="CUDA device when CUDA is available (ignored under torchrun)")
    p.add_argument("--num_class", default=None, type=int,
                   help="classes of the nets' output, at least the data set's (default: 10 or 100 from --dataset)")
    p.add_argument("--warm_up", default=None, type=int,
                   help=f"warm-up epochs (default: {WARM_UP['cifar10']} for cifar10, {WARM_UP['cifar100']} for "
                        "cifar100)")
    p.add_argument("--loss_window", "--loss_average", default=None, type=int, dest="loss_window",
                   help="normalised loss vectors averaged as the GMM input, RSL's mean loss over K epochs (default: "
                        "5 at r = 0.9, else 1)")
    p.add_argument("--output_dir", default="./checkpoint", type=str, help="logs and checkpoint go here")
    add_resume_argument(p)
    add_tensorboard_argument(p)
    p.add_argument("--download", action="store_true", help="fetch CIFAR into --data_path if it is absent")
    p.add_argument("--save_loss_every", default=10, type=int,
                   help="save per-sample losses and GMM every N co-divide epochs for plots (0: never)")
    p.add_argument("--eval_batch_size", default=1024, type=int,
                   help="batch size of loss evaluation and test (no effect on results)")
    p.add_argument("--compile", action="store_true", help="torch.compile both nets (slow first epochs)")
    p.add_argument("--net_width", default=64, type=int,
                   help="channels of the PreAct ResNet-18's first stage, doubled at each stage (64: the paper's "
                        "network; e.g. 8 for a quick smoke run)")
    p.add_argument("--pretrained", default="none",
                   help="a checkpoint whose backbone both nets start from, each with a new classifier "
                        "(Pretrain_simclr.py's <prefix>_backbone.pth or a published SimCLR file); with --ood_filter "
                        "knn its embedding finds the neighbours (C2D, Manifold DivideMix); none: random weights")
    # Successors' ideas (docs/successors.md), all off by default.
    p.add_argument("--ood_filter", default="none", choices=("none", "knn"),
                   help="knn: take the samples farthest from their k nearest neighbours in embedding space out of "
                        "both sets (Manifold DivideMix)")
    p.add_argument("--ood_k", default=10, type=int, help="neighbours of the kNN filter")
    p.add_argument("--ood_remove", default=0.1, type=float, help="fraction of the training images the filter removes")
    p.add_argument("--ood_interval", default=10, type=int, help="epochs between filterings (first: end of warm-up)")
    p.add_argument("--ood_remove_step", default=0.0, type=float,
                   help="added to --ood_remove at each later filtering (Manifold DivideMix: 0.1 first, 0.01 more "
                        "each interval)")
    p.add_argument("--mix", default="input", choices=("input", "input+embedding"),
                   help="input+embedding: also mix the penultimate embeddings (Manifold DivideMix's MixEMatch)")
    p.add_argument("--lambda_e", default=1.0, type=float, help="weight of the mixed embeddings' loss terms")
    add_engine_arguments(p)  # --amp, --channels_last, --division, --sync_bn
    return p


def resolve_settings(args):
    """Validate the arguments and fill the preset-dependent ones; return {name: where its value came from}."""
    check_flags(args, FLAG_RANGES)
    noise.resolve_noise_args(args)
    sources = {}
    kind, preset = setting_preset(args.dataset, args.noise_mode, args.r)
    preset_source = {"paper": "paper preset", "cifarn": "CIFAR-N preset of the noisypy reproduction"}.get(kind)
    for name in ("lambda_u", "p_threshold"):
        if getattr(args, name) is not None:
            sources[name] = "flag"
        elif preset is not None:
            setattr(args, name, float(preset[name]))
            sources[name] = preset_source
        else:
            setattr(args, name, float(ORIGINAL_DEFAULTS[name]))
            sources[name] = "original-code default (no paper preset for this setting)"
    window_source = "paper preset" if kind == "paper" else "rule: 5 at r = 0.9, else 1 (no paper cell for this setting)"
    derived = {"num_class": (NUM_CLASSES[args.dataset], f"from --dataset {args.dataset}"),
               "warm_up": (WARM_UP[args.dataset], f"from --dataset {args.dataset}"),
               "loss_window": (5 if args.r == 0.9 else 1, window_source)}
    for name, (value, source) in derived.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
            sources[name] = source
        else:
            sources[name] = "flag"
    if args.ood_remove >= 1:
        raise UserError(f"--ood_remove {args.ood_remove:g} would take every training image out: give a fraction "
                        "below 1")
    last = ood_fraction(args, args.num_epochs)
    if args.ood_filter == "knn" and args.ood_remove_step and last >= 1:
        raise UserError(f"--ood_remove {args.ood_remove:g} grown by --ood_remove_step {args.ood_remove_step:g} would "
                        f"reach {last:g} by epoch {args.num_epochs}, every training image: give a smaller step")
    if args.num_class < NUM_CLASSES[args.dataset]:
        raise UserError(f"--num_class {args.num_class} is below the {NUM_CLASSES[args.dataset]} "
                        f"classes of {args.dataset}: drop the flag, it follows --dataset")
    return sources


def create_model(num_class, device, precision, compile_net=False, width=64, pretrained="none", name=None):
    """A PreAct ResNet-18 on the training device, in the memory layout of `precision`; with a --pretrained file
    its backbone's weights (name: the net as the line saying what was loaded calls it)."""
    net = ResNet18(num_classes=num_class, width=width)
    if pretrained != "none":
        load_backbone(net, pretrained, "linear", "preact_resnet18", name)
    net = net.to(device)
    if precision.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compile_net:
        net.compile()  # in place: state_dict keys stay those of the plain module
    return net


def create_optimizer(net, lr):
    """SGD with momentum 0.9 and weight decay 5e-4, as in the paper."""
    return optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def co_divide_epoch(epoch, nets, train_nets, optimizers, histories, data, cfg, args, device, logs, loss_dir,
                    removed=None):
    """Loss evaluation and GMM per net, then each net trained on the other's division. Returns per-net records,
    the timings and each net's clean probabilities.

    nets are evaluated as they are; train_nets (their DistributedDataParallel wrappers with several processes)
    are trained. Every rank holds the gathered losses; rank 0 fits the GMMs and gives every rank its divisions.
    removed: the OOD filter's mask of samples kept out of both the labeled and the unlabeled set.
    """
    labels = data.noisy_labels.cpu().numpy() if cfg.division == "classwise" else None
    divisions, timing = co_divide(nets, data.eval_loader(args.eval_batch_size), cfg, device, histories=histories,
                                  clean=data.clean_mask, labels=labels)

    records = [dict(d[3]) for d in divisions]
    for k, record in enumerate(records):
        fallback = record.get("classwise", {}).get("fallback")
        if fallback:
            shown = ", ".join(map(str, fallback[:10])) + (", ..." if len(fallback) > 10 else "")
            print(f"epoch {epoch} net{k + 1} class-wise division: {len(fallback)} class(es) with fewer than "
                  f"{cfg.classwise_min_samples} samples take the global fit ({shown})", flush=True)
    if data.ood_mask is not None:  # open-set images a division counts as clean
        for record, division in zip(records, divisions):
            record["ood_labeled"] = int((division[0][data.ood_mask] > cfg.p_threshold).sum())
    for k in (1, 0):  # the original logs net2's division first: it is the one net1 trains on
        logs.write("stats", "Numer of labeled samples:%d   AUC:%.3f\n" % (records[k]["labeled"], records[k]["auc"]))

    save_now = args.save_loss_every and ((epoch - cfg.warm_up) % args.save_loss_every == 0 or epoch == args.num_epochs)
    if loss_dir and is_main_process() and save_now:
        save_division(os.path.join(loss_dir, loss_snapshot_name(epoch)), divisions, data.clean_mask, cfg.p_threshold)

    def make_loaders(k, pred, prob):
        """Labeled and unlabeled loaders of net k's division, without the samples the OOD filter removed."""
        if removed is None:
            return data.labeled_loader(pred, prob, args.batch_size), data.unlabeled_loader(pred, args.batch_size)
        return (data.labeled_loader(pred & ~removed, prob, args.batch_size),
                data.unlabeled_loader(pred | removed, args.batch_size))

    results, train_timing = co_train(epoch, train_nets, optimizers, [d[0] for d in divisions], make_loaders, cfg,
                                     device)
    timing.update(train_timing)
    for k, result in enumerate(results):
        records[k].update(result, gmm=gmm_summary(divisions[k][2]))
    return records, timing, [d[0] for d in divisions]


def ood_fraction(args, epoch):
    """The fraction the kNN filter removes at a filtering epoch: --ood_remove, grown by --ood_remove_step at each
    filtering after the first."""
    return args.ood_remove + max(epoch - args.warm_up, 0) // args.ood_interval * args.ood_remove_step


def filter_ood(nets, data, args, device, precision, fraction):
    """The kNN OOD filter: the nets (both DivideMix nets, or the pre-trained backbone) embed every training image,
    the mean of their kNN scores picks the samples removed (the same on every rank). Returns (removed mask, record
    for the log)."""
    loader = data.eval_loader(args.eval_batch_size)
    scores = sum(knn_scores(embed(net, loader, device, precision), args.ood_k) for net in nets) / len(nets)
    removed = broadcast_from_main(ood_removal(scores.cpu(), fraction))
    record = {"removed": int(removed.sum())}
    if data.ood_mask is not None:  # open-set noise: how many of the removed images were out of distribution
        hits = int((removed & data.ood_mask).sum())
        record.update(removed_ood=hits, precision=hits / record["removed"] if record["removed"] else float("nan"),
                      recall=hits / int(data.ood_mask.sum()) if data.ood_mask.any() else float("nan"))
    return removed, record


def save_division(path, divisions, clean_mask, p_threshold):
    """Per-sample GMM inputs and clean probabilities of both nets, with the fitted GMMs (for plots)."""
    arrays = {"clean": np.asarray(clean_mask, dtype=bool), "p_threshold": np.float64(p_threshold)}
    for k, (prob, input_loss, gmm, _) in enumerate(divisions, 1):
        arrays.update({f"loss{k}": input_loss.numpy().astype(np.float32), f"prob{k}": prob.astype(np.float32),
                       f"gmm{k}_means": gmm.means_.ravel(), f"gmm{k}_vars": gmm.covariances_.ravel(),
                       f"gmm{k}_weights": gmm.weights_.ravel()})
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def main(args):
    """Check the settings, open the run folder (lock, logs, checkpoint), then train in it."""
    sources = resolve_settings(args)
    if args.pretrained != "none":  # a file that does not fit is refused before anything is read or written
        with torch.random.fork_rng(devices=[]):
            load_backbone(ResNet18(args.num_class, args.net_width), args.pretrained, "linear", "preact_resnet18")
    prefix = run_prefix(args.dataset, args.r, args.noise_mode, args.ood_ratio)
    log_names = {"acc": prefix + "_acc.txt", "stats": prefix + "_stats.txt", "json": prefix + "_log.jsonl"}
    device = init_distributed(args.gpuid)
    local_batch_size(args.batch_size)
    with RunDir(args.output_dir, prefix, log_names, main=is_main_process(), tensorboard=args.tensorboard) as run:
        train(args, run, sources, device)
    return 0


def train(args, run, sources, device):
    """Set up, then run epochs start..num_epochs: warm-up or co-divide, test, log, checkpoint."""
    # ---- resume or start -----------------------------------------------------------------------------------
    defining = defining_args(args, RESUME_MAY_CHANGE)
    resume = run.open_checkpoint(args.resume, defining)

    # ---- data ----------------------------------------------------------------------------------------------
    sync_bn = check_sync_bn(args.sync_bn, device)
    precision = Precision.from_args(args, device, sources)
    print(settings_line(args, sources), flush=True)
    seed_process(args.seed)
    on_main(cifar_files.ensure_data, args.data_path, args.dataset, args.download)  # one download, by rank 0
    # labels outside 0..num_class-1 (train or test) stop the run here, before the noise file is written
    train_x, clean, test_x, test_y = cifar_files.read_cifar(args.data_path, args.dataset, args.num_class)
    ood_images = noise.read_ood_source(args.ood_path, args.dataset) if args.ood_ratio else np.zeros(0)
    # rank 0 reads or writes the noise (and replacement) file; with several processes the others get its result
    noisy, replaced, source_index, note = on_main(noise.make_noise, args, train_x, clean, args.num_class,
                                                  len(ood_images))
    noise_path = noise.noise_source(args)
    files = {"noise_file": noise_path}
    source = ("CIFAR-N file " if args.noise_mode in CIFARN_MODES else "noise file ") + noise_path
    if args.ood_ratio:
        files["ood_file"] = noise.ood_file_path(args)
        source += " and replacement file " + files["ood_file"]
        train_x[replaced] = ood_images[source_index]  # open-set images keep the label of the image they replace
    # the labels (and the replaced images) define a run like its flags
    run.check_labels(resume, defining, np.concatenate([noisy, replaced, source_index]) if args.ood_ratio else noisy,
                     source)
    shard = make_shard(args.seed)
    data = dataloader_cifar.CIFARData(train_x, noisy, clean, test_x, test_y, args.dataset, device, shard,
                                      ood=replaced if args.ood_ratio else None)
    print(f"data: {len(data)} training images, {len(test_y)} test images on {device}; {note}, "
          f"{1 - data.clean_mask.mean():.4f} of labels noisy", flush=True)

    # ---- models --------------------------------------------------------------------------------------------
    start_from = args.pretrained if resume is None else "none"  # a resumed run's weights come from its checkpoint
    nets = [create_model(args.num_class, device, precision, args.compile, args.net_width, start_from, f"net{k}")
            for k in (1, 2)]
    # Manifold DivideMix's filter finds neighbours in the self-supervised embedding: a frozen copy of the backbone
    embedders = nets
    if args.ood_filter == "knn" and args.pretrained != "none":
        embedders = [create_model(args.num_class, device, precision, width=args.net_width, pretrained=args.pretrained)]
    optimizers = [create_optimizer(net, args.lr) for net in nets]
    histories = [[], []]
    removed = None  # the OOD filter's latest removal
    cfg = DivideMixConfig.from_args(args, precision, unlabeled_loss=True, loss_window=args.loss_window)
    start_epoch = 0
    if resume is not None:
        start_epoch = run.restore(resume, nets, optimizers)
        histories = [list(h) for h in resume["histories"]]
        removed = resume.get("ood_removed")
    else:
        run.begin(run_config("Train_cifar.py", args, device, len(data), sources,
                             labels_sha256=defining["labels_sha256"], **files,
                             world_size=world_size(), sync_bn=sync_bn))
    train_nets = wrap_ddp(nets, device, sync_bn)
    loss_dir = run.path(LOSSES_SUFFIX)
    if run.main:
        os.makedirs(loss_dir, exist_ok=True)

    # ---- epochs --------------------------------------------------------------------------------------------
    test_loader = data.test_loader(args.eval_batch_size)
    for epoch in range(start_epoch, args.num_epochs + 1):
        t_epoch = time.perf_counter()
        if shard is not None:
            shard.start_epoch(epoch)
        lr = [set_learning_rate(opt, args.lr, epoch, LR_DECAY_EPOCH) for opt in optimizers][0]
        extra = {}  # the epoch's further log entries (the OOD filter's)
        probs = None  # each net's clean probabilities, made in a co-divide epoch
        if epoch < args.warm_up:
            phase = "warmup"
            records, timing = co_warmup(epoch, train_nets, optimizers,
                                        lambda: data.warmup_loader(args.batch_size * 2), device,
                                        args.noise_mode == "asym" or args.noise_mode in CIFARN_MODES,
                                        precision)
        else:
            phase = "train"
            if args.ood_filter == "knn" and (epoch - args.warm_up) % args.ood_interval == 0:
                t0 = time.perf_counter()
                removed, extra["ood_filter"] = filter_ood(embedders, data, args, device, precision,
                                                          ood_fraction(args, epoch))
                extra["ood_filter"]["seconds"] = time.perf_counter() - t0
                print(f"epoch {epoch} OOD filter: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                              for k, v in extra["ood_filter"].items()), flush=True)
            records, timing, probs = co_divide_epoch(epoch, nets, train_nets, optimizers, histories, data, cfg, args,
                                                     device, run.logs, loss_dir, removed)
        sync_buffers(nets)
        t0 = time.perf_counter()
        acc = evaluate(nets, test_loader, device, precision=precision)[0]
        timing["test"] = time.perf_counter() - t0
        run.logs.write("acc", "Epoch:%d   Accuracy:%.2f\n" % (epoch, acc))
        details = ""
        if phase == "train":
            details = "  labeled %d/%d  Lx %.3f/%.3f  Lu %.4f/%.4f" % (
                records[0]["labeled"], records[1]["labeled"], records[0]["Lx"], records[1]["Lx"],
                records[0]["Lu"], records[1]["Lu"])
        state = {"ood_removed": removed} if args.ood_filter != "none" else {}
        end_epoch(run, epoch, phase, lr, t_epoch, f"test {acc:6.2f}%", records, timing,
                  run_state(epoch, defining, args, nets, optimizers, histories=histories, **state),
                  scores={"test_acc": acc}, extra=extra, details=details, probs=probs)


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser().parse_args()))
