"""The published DivideMix numbers our runs are compared with, where each comes from, and which report table a
CIFAR cell belongs to. Plain data and lookups: no torch, no matplotlib."""
from collections import namedtuple

# A published number beside a row: its source (a key of SOURCES), best-epoch accuracy with its std where the
# source gives one, and the mean of the last 10 epochs where the source gives it.
Published = namedtuple("Published", "source best best_std last")

# The DivideMix paper (Li, Socher and Hoi, ICLR 2020, arXiv:2002.07394), Table 1 (symmetric noise) and Table 2
# (CIFAR-10, 40% asymmetric noise): test accuracy (%), best over epochs / mean of the last 10.
PAPER_CIFAR = {
    ("cifar10", "sym", 0.2): (96.1, 95.7),
    ("cifar10", "sym", 0.5): (94.6, 94.4),
    ("cifar10", "sym", 0.8): (93.2, 92.9),
    ("cifar10", "sym", 0.9): (76.0, 75.4),
    ("cifar10", "asym", 0.4): (93.4, 92.1),
    ("cifar100", "sym", 0.2): (77.3, 76.9),
    ("cifar100", "sym", 0.5): (74.6, 74.2),
    ("cifar100", "sym", 0.8): (60.2, 59.6),
    ("cifar100", "sym", 0.9): (31.5, 31.0),
}
PAPER_CLOTHING1M_TEST = 74.76  # the paper's Table 3
# The paper's Table 4: top-1 / top-5 on WebVision val and on ILSVRC12 val of the same 50 classes.
PAPER_WEBVISION = {"webvision_top1": 77.32, "webvision_top5": 91.64, "imagenet_top1": 75.20, "imagenet_top5": 90.84}

# DivideMix on the human labels of CIFAR-10N / CIFAR-100N, best epoch, (mean, std).
CIFARN_PAPER = {
    ("cifar10", "aggre"): (95.01, 0.71), ("cifar10", "rand1"): (95.16, 0.19), ("cifar10", "rand2"): (95.23, 0.07),
    ("cifar10", "rand3"): (95.21, 0.14), ("cifar10", "worst"): (92.56, 0.42), ("cifar100", "noisy100"): (71.13, 0.48),
}
CIFARN_NOISYPY = {
    ("cifar10", "aggre"): (95.62, 0.09), ("cifar10", "rand1"): (95.72, 0.11), ("cifar10", "rand2"): (95.78, 0.10),
    ("cifar10", "rand3"): (95.71, 0.09), ("cifar10", "worst"): (93.10, 0.10), ("cifar100", "noisy100"): (70.91, 0.09),
}
CIFARN_ROW_ORDER = ("aggre", "rand1", "rand2", "rand3", "worst", "noisy100")  # the CIFAR-N table's row order
# DivideMix on CIFAR-100 with instance-dependent noise, by r.
IDN_INSTANCEGM = {0.2: 77.07, 0.3: 76.33, 0.4: 70.80, 0.45: 57.78, 0.5: 58.61}

SOURCES = {
    "dividemix": ("DivideMix paper", "Li, Socher and Hoi, \"DivideMix: Learning with Noisy Labels as "
                  "Semi-supervised Learning\", ICLR 2020 (arXiv:2002.07394), Table 1 (symmetric noise) and Table 2 "
                  "(CIFAR-10, 40% asymmetric noise); best epoch and mean of the last 10 epochs."),
    "cifarn": ("CIFAR-N paper", "Wei et al., \"Learning with Noisy Labels Revisited: A Study Using Real-World "
               "Human Annotations\", ICLR 2022: DivideMix on CIFAR-10N and CIFAR-100N, best epoch, mean ± std of "
               "3 runs."),
    "noisypy": ("noisypy reproduction", "noisypy, an independent reproduction of DivideMix on CIFAR-N "
                "(PreAct ResNet-18, 300 epochs): best epoch, mean ± std."),
    "instancegm": ("InstanceGM paper", "Garg et al., \"Instance-Dependent Noisy Label Learning via Graphical "
                   "Modelling\", WACV 2023: DivideMix on CIFAR-100 with instance-dependent noise as reported "
                   "there, on the labels of Xia et al.'s generator as its CIFAR loader calls it (seed 123), which "
                   "--noise_mode idn reproduces. Taken here as best-epoch numbers and compared with our best epoch."),
}

# Report tables of CIFAR runs, in report order: (table id, heading).
CIFAR_TABLES = (("cifar", "CIFAR (paper Table 1)"), ("cifar_n", "CIFAR-N (human labels)"),
                ("cifar_idn", "CIFAR-100, instance-dependent noise (idn)"),
                ("cifar_other", "Other CIFAR settings (no published numbers)"))


def cifar_table(dataset, mode, ood_ratio):
    """Report table of a CIFAR cell: Table 1 for the paper's families, else CIFAR-N, CIFAR-100 idn or other."""
    if ood_ratio:
        return "cifar_other"  # nothing is published for DivideMix with replaced (open-set) images
    if mode == "sym" or (mode == "asym" and dataset == "cifar10"):
        return "cifar"
    if (dataset, mode) in CIFARN_PAPER:
        return "cifar_n"
    if mode == "idn" and dataset == "cifar100":
        return "cifar_idn"
    return "cifar_other"


def cifar_published(dataset, mode, r, ood_ratio):
    """The published numbers of a CIFAR cell, primary source first; [] where nothing is published."""
    table = cifar_table(dataset, mode, ood_ratio)
    if table == "cifar" and (dataset, mode, r) in PAPER_CIFAR:
        best, last = PAPER_CIFAR[(dataset, mode, r)]
        return [Published("dividemix", best, None, last)]
    if table == "cifar_n":
        return [Published(source, *numbers[(dataset, mode)], None)
                for source, numbers in (("cifarn", CIFARN_PAPER), ("noisypy", CIFARN_NOISYPY))]
    if table == "cifar_idn" and r in IDN_INSTANCEGM:
        return [Published("instancegm", IDN_INSTANCEGM[r], None, None)]
    return []
