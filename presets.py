"""The CIFAR settings' presets and names, each written once and free of torch.

Train_cifar.py, dataloader_cifar.py, the sweep, the report and the tests import these: the paper's per-setting
lambda_u and p_threshold (DivideMix, ICLR 2020, appendix), the CIFAR-N preset, the warm-up lengths, the noise ratio
as file names show it, the run prefix and the noise file's name.
"""
from decimal import Decimal

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
# The paper's per-setting values (appendix); the original code's defaults are lambda_u 25, p_threshold 0.5.
PAPER_PRESETS = {
    ("cifar10", "sym", 0.2): {"lambda_u": 0, "p_threshold": 0.5},
    ("cifar10", "sym", 0.5): {"lambda_u": 25, "p_threshold": 0.5},
    ("cifar10", "sym", 0.8): {"lambda_u": 25, "p_threshold": 0.5},
    ("cifar10", "sym", 0.9): {"lambda_u": 50, "p_threshold": 0.6},
    ("cifar10", "asym", 0.4): {"lambda_u": 0, "p_threshold": 0.5},
    ("cifar100", "sym", 0.2): {"lambda_u": 25, "p_threshold": 0.5},
    ("cifar100", "sym", 0.5): {"lambda_u": 150, "p_threshold": 0.5},
    ("cifar100", "sym", 0.8): {"lambda_u": 150, "p_threshold": 0.5},
    ("cifar100", "sym", 0.9): {"lambda_u": 150, "p_threshold": 0.6},
}
ORIGINAL_DEFAULTS = {"lambda_u": 25, "p_threshold": 0.5}
# The noise modes drawn at a rate r (instance-dependent noise too); CIFAR-N's modes below bring their own labels.
SYNTHETIC_MODES = ("sym", "asym", "idn")
# CIFAR-N (Wei et al., ICLR 2022): each human-label mode and the data set it labels.
CIFARN_MODES = {"aggre": "cifar10", "worst": "cifar10", "rand1": "cifar10", "rand2": "cifar10", "rand3": "cifar10",
                "noisy100": "cifar100"}
# CIFAR-N's human labels: the settings of the independent noisypy reproduction (the CIFAR-N authors published
# none), with the warm-up's confidence penalty.
CIFARN_PRESET = {"lambda_u": 0, "p_threshold": 0.5}
WARM_UP = {"cifar10": 10, "cifar100": 30}


def setting_preset(dataset, noise_mode, r):
    """The preset of a CIFAR setting and its kind: ("paper", values) for the paper's own cells (only its own r: 0.45
    gets no cell of 0.4 or 0.5), ("cifarn", values) for CIFAR-N's labels, (None, None) for every other setting."""
    if noise_mode in CIFARN_MODES:
        return "cifarn", CIFARN_PRESET
    preset = PAPER_PRESETS.get((dataset, noise_mode, r))
    return ("paper", preset) if preset is not None else (None, None)


def ratio_text(r):
    """r as file names show it: one decimal where that is exact (the original's names), else every digit of r."""
    r = float(r)
    if r == round(r, 1):
        return "%.1f" % r
    # repr is the shortest text that reads back as r; Decimal writes it without an exponent (1e-05 -> 0.00001)
    return format(Decimal(repr(r)), "f")


def run_prefix(dataset, r, noise_mode, ood_ratio=0.0):
    """File-name prefix of a CIFAR run: cifar10_0.5_sym as the original's logs; CIFAR-N runs (r None) cifar10_worst;
    `_ood<O>` appended with open-set noise."""
    cifarn = r is None or noise_mode in CIFARN_MODES
    prefix = f"{dataset}_{noise_mode}" if cifarn else f"{dataset}_{ratio_text(r)}_{noise_mode}"
    return prefix + (f"_ood{ratio_text(ood_ratio)}" if ood_ratio else "")


def noise_file_name(r, noise_mode, ood_ratio=0.0):
    """<r>_<noise_mode>.json: the original code's name (0.5_sym.json) for one-decimal r; with open-set noise
    <r>_<noise_mode>_ood<O>.json (the in-distribution noise then falls on fewer images)."""
    suffix = f"_ood{ratio_text(ood_ratio)}" if ood_ratio else ""
    return f"{ratio_text(r)}_{noise_mode}{suffix}.json"


# SimCLR pre-training (Pretrain_simclr.py): the CIFAR recipe of SupContrast's SimCLR command (Khosla et al.,
# github.com/HobbitLong/SupContrast, README), the implementation Contrast to Divide (C2D, Zheltonozhskii et al.,
# WACV 2022) names for its self-supervised start. The batch size, learning rate, temperature and cosine schedule
# are that command's flags; the rest are the defaults of its main_supcon.py (see docs/pretraining.md).
SIMCLR_SOURCE = "SupContrast SimCLR recipe for CIFAR (C2D)"
SIMCLR_RECIPE = {
    "epochs": 1000, "batch_size": 1024, "lr": 0.5, "momentum": 0.9, "weight_decay": 1e-4, "temperature": 0.5,
    "warm_epochs": 10, "warmup_from": 0.01, "lr_decay_rate": 0.1,
    "crop_scale": (0.2, 1.0), "jitter": (0.4, 0.4, 0.4, 0.1), "jitter_p": 0.8, "grayscale_p": 0.2, "feat_dim": 128,
}
# The weighted kNN classifier that measures an embedding while it trains (Wu et al., CVPR 2018, instance
# discrimination): the k most similar training images vote with weight exp(similarity / temperature).
KNN_MONITOR = {"k": 200, "temperature": 0.1}
