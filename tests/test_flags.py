"""Every numeric flag of every script is range-checked before anything is read or written; allowed edge values run.

Most values are checked in-process through each script's validation (fast); a handful run the scripts as
subprocesses for the end-to-end guarantee: exit code 2, one `error: ...` line, no traceback, nothing written.
"""
import importlib
import json
import math
import os

import numpy as np
import pytest
import torch

import bench
from checkpointing import check_resume_args
from cli import UserError
import dividemix
from fake_cifar import write_fake_cifar
from flags import SEED, TRAIN_FLAGS, Range, check_flags, check_value, defining_args
import noise
from presets import PAPER_PRESETS
import Pretrain_simclr
import Train_cifar
import Train_clothing1M
import Train_custom
import Train_webvision
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_TEXT = "0..4294967295"


def _validate_cifar(args):
    """Train_cifar.py's checks at the top of main()."""
    Train_cifar.resolve_settings(args)


def _validate_noise_command(args):
    """The noise-file command's checks at the top of its main()."""
    check_flags(args, noise.NOISE_FLAGS)
    noise.resolve_noise_args(args)


SCRIPTS = {
    "Train_cifar.py": (Train_cifar.get_args_parser, _validate_cifar, Train_cifar.FLAG_RANGES),
    "Train_clothing1M.py": (Train_clothing1M.get_args_parser, lambda a: check_flags(a, Train_clothing1M.FLAG_RANGES),
                            Train_clothing1M.FLAG_RANGES),
    "Train_webvision.py": (Train_webvision.get_args_parser, lambda a: check_flags(a, Train_webvision.FLAG_RANGES),
                           Train_webvision.FLAG_RANGES),
    "dataloader_cifar.py": (noise.get_args_parser, _validate_noise_command, noise.NOISE_FLAGS),
    "bench.py": (bench.get_args_parser, lambda a: check_flags(a, bench.FLAG_RANGES), bench.FLAG_RANGES),
    "Pretrain_simclr.py": (Pretrain_simclr.get_args_parser, Pretrain_simclr.resolve_settings,
                           Pretrain_simclr.FLAG_RANGES),
}
TRAINING = ("Train_cifar.py", "Train_clothing1M.py", "Train_webvision.py")

# (flag, value, the text the message must hold): shared by the three training scripts.
COMMON_BAD = [
    ("seed", "-1", f"--seed -1 is outside {SEED_TEXT}: give an integer in that range"),
    ("seed", "4294967296", f"--seed 4294967296 is outside {SEED_TEXT}"),
    ("lr", "nan", "--lr nan is not allowed: give a number > 0"),
    ("lr", "inf", "--lr inf is not allowed: give a number > 0"),
    ("lr", "-inf", "--lr -inf is not allowed: give a number > 0"),
    ("lr", "0", "--lr 0.0 is not allowed: give a number > 0"),
    ("alpha", "0", "--alpha 0.0 is not allowed: give a number > 0"),
    ("alpha", "nan", "--alpha nan is not allowed: give a number > 0"),
    ("T", "0", "--T 0.0 is not allowed: give a number > 0"),
    ("T", "-0.5", "--T -0.5 is not allowed: give a number > 0"),
    ("lambda_u", "-1", "--lambda_u -1.0 is not allowed: give a number >= 0"),
    ("lambda_u", "inf", "--lambda_u inf is not allowed: give a number >= 0"),
    ("p_threshold", "nan", "--p_threshold nan is not allowed: give a number in [0, 1]"),
    ("p_threshold", "1.5", "--p_threshold 1.5 is outside [0, 1]: give a number in that range"),
    ("p_threshold", "-0.1", "--p_threshold -0.1 is outside [0, 1]"),
    ("num_epochs", "-1", "--num_epochs -1 is not allowed: give an integer >= 0"),
    ("batch_size", "0", "--batch_size 0 is not allowed: give an integer >= 1"),
    ("gpuid", "-1", "--gpuid -1 is not allowed: give an integer >= 0"),
    ("num_class", "1", "--num_class 1 is not allowed: give an integer >= 2"),
]
SPECIFIC_BAD = {
    "Train_cifar.py": [
        ("warm_up", "-1", "--warm_up -1 is not allowed: give an integer >= 0"),
        ("r", "1.5", "--r 1.5 is outside [0, 1]: give a number in that range (the noise ratio as a fraction"),
        ("r", "nan", "--r nan is not allowed: give a number in [0, 1]"),
        ("r", "-0.1", "--r -0.1 is outside [0, 1]"),
        ("eval_batch_size", "0", "--eval_batch_size 0 is not allowed: give an integer >= 1"),
        ("save_loss_every", "-1", "--save_loss_every -1 is not allowed: give an integer >= 0 (0: never)"),
        ("loss_window", "0", "--loss_window 0 is not allowed: give an integer >= 1"),
    ],
    "Train_clothing1M.py": [
        ("warm_up", "0", "--warm_up 0 is not allowed: give an integer >= 1 (epoch 0 warms up"),
        ("warm_up", "-1", "--warm_up -1 is not allowed: give an integer >= 1"),
        ("num_batches", "0", "--num_batches 0 is not allowed: give an integer >= 1"),
        ("image_size", "32", "--image_size 32 is not allowed: give an integer >= 33"),
        ("num_workers", "-1", "--num_workers -1 is not allowed: give an integer >= 0"),
    ],
    "Train_webvision.py": [
        ("warm_up", "0", "--warm_up 0 is not allowed: give an integer >= 1"),
        ("image_size", "106", "--image_size 106 is not allowed: give an integer >= 107"),
        ("num_workers", "-1", "--num_workers -1 is not allowed: give an integer >= 0"),
    ],
    "dataloader_cifar.py": [
        ("seed", "-1", f"--seed -1 is outside {SEED_TEXT}"),
        ("seed", "4294967296", f"--seed 4294967296 is outside {SEED_TEXT}"),
        ("r", "2", "--r 2.0 is outside [0, 1]"),
        ("r", "inf", "--r inf is not allowed: give a number in [0, 1]"),
    ],
    "Pretrain_simclr.py": [
        ("epochs", "0", "--epochs 0 is not allowed: give an integer >= 1"),
        ("batch_size", "1", "--batch_size 1 is not allowed: give an integer >= 2 (NT-Xent needs two images)"),
        ("temperature", "0", "--temperature 0.0 is not allowed: give a number > 0"),
        ("crop_min_scale", "0", "--crop_min_scale 0.0 is outside (0, 1]: give a number in that range"),
        ("momentum", "1.5", "--momentum 1.5 is outside [0, 1]"),
        ("warm_epochs", "-1", "--warm_epochs -1 is not allowed: give an integer >= 0"),
        ("knn_k", "0", "--knn_k 0 is not allowed: give an integer >= 1"),
        ("image_size", "8", "--image_size 8 is not allowed: give an integer >= 16"),
    ],
    "bench.py": [
        ("num_train", "15", "--num_train 15 is not allowed: give an integer >= 16"),
        ("num_test", "0", "--num_test 0 is not allowed: give an integer >= 1"),
        ("batch_size", "0", "--batch_size 0 is not allowed: give an integer >= 1"),
        ("eval_batch_size", "0", "--eval_batch_size 0 is not allowed: give an integer >= 1"),
        ("num_workers", "-1", "--num_workers -1 is not allowed: give an integer >= 0"),
        ("epochs", "0", "--epochs 0 is not allowed: give an integer >= 1"),
        ("seed", "-1", f"--seed -1 is outside {SEED_TEXT}"),
    ],
}
BAD = [(s, *case) for s in TRAINING for case in COMMON_BAD] + \
      [(s, *case) for s, cases in SPECIFIC_BAD.items() for case in cases]

# Allowed edge values: accepted by the checks (warm-up beyond num_epochs is a warm-up-only run).
GOOD = {
    "Train_cifar.py": [["--seed", "0"], ["--seed", "4294967295"], ["--p_threshold", "0"], ["--p_threshold", "1"],
                       ["--lambda_u", "0"], ["--warm_up", "0"], ["--num_epochs", "0", "--warm_up", "5"],
                       ["--r", "0"], ["--r", "1"], ["--alpha", "1e-300"], ["--T", "1e-3"], ["--T", "1"],
                       ["--save_loss_every", "0"], ["--num_class", "11"], ["--lr", "1e-9"]],
    "Train_clothing1M.py": [["--warm_up", "1"], ["--num_workers", "0"], ["--image_size", "33"], ["--lambda_u", "0"]],
    "Train_webvision.py": [["--warm_up", "100", "--num_epochs", "3"], ["--image_size", "107"], ["--seed", "0"]],
    "dataloader_cifar.py": [["--r", "0"], ["--r", "1"], ["--seed", "4294967295"]],
    "bench.py": [["--num_train", "16"], ["--epochs", "1"], ["--num_workers", "0"]],
    "Pretrain_simclr.py": [["--batch_size", "2"], ["--crop_min_scale", "1"], ["--warm_epochs", "0"],
                           ["--dataset", "custom", "--image_size", "16"]],
}


def _parse(script, argv):
    """Parsed arguments of one script."""
    return SCRIPTS[script][0]().parse_args(argv)


@pytest.mark.parametrize("script,flag,value,message", BAD, ids=[f"{s}-{f}={v}" for s, f, v, _ in BAD])
def test_bad_value_is_refused_with_its_range(script, flag, value, message):
    args = _parse(script, [f"--{flag}={value}"])
    with pytest.raises(UserError) as info:
        SCRIPTS[script][1](args)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("script,argv", [(s, a) for s, cases in GOOD.items() for a in cases],
                         ids=[f"{s}-{' '.join(a)}" for s, cases in GOOD.items() for a in cases])
def test_allowed_edge_values_pass(script, argv):
    SCRIPTS[script][1](_parse(script, argv))


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_numeric_flag_has_a_range(script):
    """A numeric flag added to a parser without a range entry fails here."""
    parser, _, table = SCRIPTS[script]
    numeric = {a.dest for a in parser()._actions if a.type in (int, float)}
    assert numeric and numeric == numeric & set(table), sorted(numeric - set(table))
    assert set(table) <= {a.dest for a in parser()._actions}


@pytest.mark.parametrize("script", TRAINING)
def test_defaults_are_in_range(script):
    SCRIPTS[script][1](_parse(script, []))


def test_range_texts():
    assert SEED.text(True) == SEED_TEXT
    assert Range(0, 1).text(False) == "[0, 1]"
    assert Range(0, low_open=True).text(False) == "> 0"
    assert Range(1).text(True) == ">= 1"
    with pytest.raises(UserError, match=r"--x 0.5 is outside \(0.5, 1\]"):
        check_value("x", 0.5, Range(0.5, 1, low_open=True))
    assert TRAIN_FLAGS["seed"] is SEED


# ----------------------------------------------------------------------------- the settings record

@pytest.mark.parametrize("argv,window,source", [
    (["--r", "0.9"], 5, "paper preset"),
    (["--r", "0.9", "--dataset", "cifar100"], 5, "paper preset"),
    (["--r", "0.5"], 1, "paper preset"),
    (["--r", "0.9", "--noise_mode", "asym"], 5, "rule: 5 at r = 0.9, else 1 (no paper cell for this setting)"),
    (["--r", "0.45"], 1, "rule: 5 at r = 0.9, else 1 (no paper cell for this setting)"),
    (["--r", "0.9", "--loss_window", "2"], 2, "flag"),
])
def test_settings_say_paper_preset_only_for_a_paper_cell(argv, window, source):
    args = _parse("Train_cifar.py", argv)
    sources = Train_cifar.resolve_settings(args)
    assert args.loss_window == window and sources["loss_window"] == source
    in_paper = (args.dataset, args.noise_mode, args.r) in PAPER_PRESETS
    for name in ("lambda_u", "p_threshold"):
        assert (sources[name] == "paper preset") == in_paper


def test_near_paper_r_gets_no_paper_preset():
    """--r 0.499 trains at 0.499 under its own name: the 0.5 cell's values are not claimed for it."""
    args = _parse("Train_cifar.py", ["--r", "0.499", "--dataset", "cifar100"])
    sources = Train_cifar.resolve_settings(args)
    assert args.lambda_u == 25 and sources["lambda_u"].startswith("original-code default")


# ----------------------------------------------------------------------------- end to end, as subprocesses

def _run(script, *args):
    """Run a script of the repository; return the completed process."""
    return runs.run_script(script, *args, check=False)


def _tree(path):
    """Every file under path with its size, to see that nothing was written."""
    return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getsize(os.path.join(d, f)))
                  for d, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(str(path), "cifar10", n_train=40, n_test=10)
    return str(path)


@pytest.mark.parametrize("script,args,needle", [
    ("Train_cifar.py", ["--seed", "-1"], f"--seed -1 is outside {SEED_TEXT}"),
    ("Train_clothing1M.py", ["--p_threshold", "nan"], "--p_threshold nan is not allowed: give a number in [0, 1]"),
    ("Train_webvision.py", ["--warm_up", "-1"], "--warm_up -1 is not allowed: give an integer >= 1"),
    ("dataloader_cifar.py", ["--seed", "4294967296"], f"--seed 4294967296 is outside {SEED_TEXT}"),
    ("bench.py", ["--device", "cpu", "--epochs", "0"], "--epochs 0 is not allowed: give an integer >= 1"),
])
def test_scripts_refuse_bad_values_before_writing(tmp_path, cifar_dir, script, args, needle):
    out = tmp_path / "out"
    before = _tree(cifar_dir)
    where = ["--data_path", cifar_dir, "--output_dir", out] if script.startswith("Train") else []
    if script == "dataloader_cifar.py":
        where = ["--data_path", cifar_dir]
    proc = _run(script, *where, *args)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not out.exists() and _tree(cifar_dir) == before


# ----------------------------------------------------------------------------- allowed edge values train

@pytest.fixture(scope="module")
def tiny_cifar_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_cifar")
    write_fake_cifar(str(path), "cifar10", n_train=16, n_test=4)
    return str(path)


def _train(data, out, *args):
    """A two-epoch Train_cifar.py run without warm-up (both epochs co-divide); returns its JSON log records."""
    proc = _run("Train_cifar.py", "--data_path", data, "--output_dir", out, "--batch_size", 4, "--eval_batch_size",
                64, "--num_epochs", 1, "--warm_up", 0, "--save_loss_every", 0, "--net_width", 8, *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    prefix = os.path.join(out, "cifar10_0.5_sym")
    return [json.loads(line) for line in open(prefix + "_log.jsonl")]


def test_edge_values_train_past_epoch_0(tiny_cifar_dir, tmp_path):
    """No warm-up, a tiny alpha and T, no unlabeled loss: both epochs co-divide and stay finite."""
    records = _train(tiny_cifar_dir, tmp_path, "--alpha", "1e-300", "--T", "1e-3", "--lambda_u", 0)
    assert [r["phase"] for r in records] == ["train", "train"]
    for record in records:
        for k in ("net1", "net2"):
            assert record[k]["iterations"] >= 1 and math.isfinite(record[k]["Lx"]), record
            assert all(math.isfinite(m) for m in record[k]["gmm"]["means"]), record


@pytest.mark.parametrize("p_threshold", ["0", "1"])
def test_extreme_thresholds_run_to_the_end(tiny_cifar_dir, tmp_path, p_threshold):
    """tau 1 labels no sample (nets not trained), tau 0 labels every sample: both run on, logged."""
    records = _train(tiny_cifar_dir, tmp_path, "--p_threshold", p_threshold, "--T", 1)
    assert [r["phase"] for r in records] == ["train", "train"]
    labeled = [r[k]["labeled"] for r in records for k in ("net1", "net2")]
    assert all(n == 0 for n in labeled) if p_threshold == "1" else all(n > 0 for n in labeled)


def test_sharpen_with_a_tiny_temperature_is_the_argmax():
    p = torch.softmax(torch.randn(6, 10) * 0.01, dim=1)  # near uniform: every p ** 1000 underflows to 0
    out = dividemix.sharpen(p, 1e-3)
    assert torch.isfinite(out).all()
    assert torch.equal(out.argmax(1), p.argmax(1)) and torch.allclose(out.sum(1), torch.ones(6))
    normal = torch.tensor([[0.6, 0.4]])
    assert torch.equal(dividemix.sharpen(normal, 0.5), (normal ** 2) / (normal ** 2).sum(1, keepdim=True))


def test_train_step_survives_a_nan_beta_draw(monkeypatch):
    """numpy's Beta(alpha, alpha) draw is NaN for alpha near the smallest double; the step takes l = 1."""
    torch.manual_seed(0)
    net, net2 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), torch.nn.Linear(12, 3)
    net2 = torch.nn.Sequential(torch.nn.Flatten(), net2)
    monkeypatch.setattr(dividemix.np.random, "beta", lambda a, b: float("nan"))
    batch = [torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,)), torch.rand(4),
             torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    cfg = dividemix.DivideMixConfig(num_class=3, alpha=5e-324)
    Lx, Lu, loss = dividemix.train_step(net, net2, opt, batch, cfg, 1.0)
    assert all(math.isfinite(float(v)) for v in (Lx, Lu, loss))
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_unparsable_number_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        Train_webvision.get_args_parser().parse_args(["--lr", "fast"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --lr/--learning_rate: invalid float value: 'fast'")


@pytest.mark.parametrize("parser,argv,message", [
    (Train_webvision.get_args_parser, ["--train_crop", "centre"],
     "unknown --train_crop 'centre': use one of random_resized, center"),
    (Train_cifar.get_args_parser, ["--dataset", "svhn"], "unknown --dataset 'svhn': use one of cifar10, cifar100"),
    (noise.get_args_parser, ["--noise_mode", "pairflip"], "unknown --noise_mode 'pairflip': use one of sym, asym"),
    (Train_cifar.get_args_parser, ["--mix", "embedding"], "unknown --mix 'embedding'"),
    (Train_custom.get_args_parser, ["--arch", "resnet101"], "unknown --arch 'resnet101'"),
    (bench.get_args_parser, ["--device", "gpu"], "unknown --device 'gpu': use one of cpu, cuda"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_value_outside_a_fixed_set_is_refused_at_parse_time(capsys, parser, argv, message):
    """Refused by the parser, before any data is read: one line, exit code 2."""
    with pytest.raises(SystemExit) as info:
        parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err


@pytest.mark.parametrize("script", ["report.py", "plots.py"])
def test_torch_free_scripts_report_a_bad_flag_on_one_line(tmp_path, script):
    proc = _run(script, str(tmp_path), "--bogus")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unrecognized arguments: --bogus"), proc.stderr


def test_numpy_seed_range_is_the_check():
    """The range is numpy's: its ends seed, one beyond does not."""
    for seed in (SEED.low, SEED.high):
        np.random.seed(seed)
    with pytest.raises(ValueError):
        np.random.seed(SEED.high + 1)


def test_no_flag_is_an_abbreviation_of_a_torchrun_option():
    """torchrun's parser reads every --word of the command line as a possible abbreviation of its own options, so a
    script flag that begins one of them stops `torchrun ... Train_*.py` before the script starts. --r is the
    original's name and stays; --noise_ratio is its spelling under torchrun."""
    from torch.distributed.run import get_args_parser as torchrun_parser
    theirs = [o for action in torchrun_parser()._actions for o in action.option_strings if o.startswith("--")]
    for script in ("Train_cifar.py", "Train_clothing1M.py", "Train_webvision.py", "noise.py"):
        module = importlib.import_module(script[:-3])
        ours = [o for action in module.get_args_parser()._actions for o in action.option_strings
                if o.startswith("--") and o not in ("--r", "--help")]
        clashes = [(o, t) for o in ours for t in theirs if t.startswith(o)]
        assert not clashes, (script, clashes)
    assert [t for t in theirs if t.startswith("--r")]  # why --r itself is left out above
    args = importlib.import_module("Train_cifar").get_args_parser().parse_args(["--noise_ratio", "0.8"])
    assert args.r == 0.8


# ----------------------------------------------------------------------------- what --resume compares

@pytest.mark.parametrize("script", [Train_cifar, Train_clothing1M, Train_webvision, Train_custom],
                         ids=lambda m: m.__name__)
def test_resume_refuses_a_new_flag_unless_listed(script):
    parser = script.get_args_parser()
    parser.add_argument("--brand_new", type=int, default=0)
    saved = defining_args(parser.parse_args([]), script.RESUME_MAY_CHANGE)
    changed = defining_args(parser.parse_args(["--brand_new", "1"]), script.RESUME_MAY_CHANGE)
    with pytest.raises(UserError, match="made with --brand_new 0, this run has 1"):
        check_resume_args(saved, changed, changed.keys())
    # listed among the flags that may change, it is not compared
    free = script.RESUME_MAY_CHANGE + ("brand_new",)
    saved, changed = (defining_args(parser.parse_args(a), free) for a in ([], ["--brand_new", "1"]))
    check_resume_args(saved, changed, changed.keys())
    # every listed flag is one of the script's; the run's length may change, its seed may not
    assert set(script.RESUME_MAY_CHANGE) <= {a.dest for a in parser._actions}
    assert "num_epochs" not in saved and "seed" in saved
