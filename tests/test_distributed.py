"""Several processes under torchrun on the CPU (gloo) and tiny data: the three scripts end to end, world size 1
equal to the plain command, identical weights and divisions on every rank, reproducible logs, resume with 2
processes and with another count, a killed rank, torchrun's restarts, bench.py's scaling report, and the pieces
(tests/dist_checks.py)."""
import json
import os
import time

import numpy as np
import pytest
import torch

from checkpointing import verify_checkpoint
import cifar_files
import dataloader_cifar
from dividemix import division_stats, eval_train, normalise_losses
from fake_cifar import write_fake_cifar
from fake_realworld import write_fake_clothing1m, write_fake_webvision
from PreResNet import ResNet18
from runs import CIFAR_FAST as FAST, LARGE_ON_DISK, PREFIX, run_script, run_torchrun as torchrun

pytestmark = pytest.mark.slow  # every test here starts training processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cifar_args(data, out, epochs, *extra):
    """Train_cifar.py's arguments for the tiny data set."""
    return ["--data_path", data, "--output_dir", out, "--num_epochs", epochs, *FAST, *extra]


def launch(*script):
    """The command of a script run through tests/dist_launch.py (probes and faults)."""
    return [os.path.join(ROOT, "tests", "dist_launch.py"), *script]


def ok(proc):
    """Assert a torchrun job succeeded; return it."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def records(out):
    """The JSON log without its timing fields."""
    result = [json.loads(line) for line in open(os.path.join(out, PREFIX + "_log.jsonl")).read().splitlines()]
    for rec in result:
        rec.pop("seconds", None), rec.pop("time", None)
    return result


def assert_same_run(out, reference):
    """Text logs, JSON log and final weights equal bit for bit."""
    for name in (PREFIX + "_acc.txt", PREFIX + "_stats.txt"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(reference, name), "rb").read(), name
    assert records(out) == records(reference)
    a = torch.load(os.path.join(out, PREFIX + "_checkpoint.pth.tar"), weights_only=False)
    b = torch.load(os.path.join(reference, PREFIX + "_checkpoint.pth.tar"), weights_only=False)
    assert a["epoch"] == b["epoch"]
    for k in range(2):
        for name, tensor in b["nets"][k].items():
            assert torch.equal(a["nets"][k][name], tensor), name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(str(path), "cifar10", n_train=33, n_test=17)  # odd sizes: padding and uneven spans
    return path


@pytest.fixture(scope="module")
def two(data, tmp_path_factory):
    """A 2-process run of epochs 0 (warm-up) and 1 (co-divide) with probes: (folder, probe folder)."""
    out = tmp_path_factory.mktemp("two") / "run"
    probe = tmp_path_factory.mktemp("probe")
    ok(torchrun(2, *launch("Train_cifar.py"), *cifar_args(data, out, 1), env={"PROBE": str(probe)}))
    return out, probe


def test_pieces_on_two_ranks(tmp_path):
    """DDP warm-up step = single step on the whole batch, prior penalty and its gradient, mixing partners within a
    rank, shard orders, even batches of odd sets, gathered loss evaluation and accuracy, NT-Xent's gathered
    negatives."""
    out = tmp_path / "passed.json"
    ok(torchrun(2, os.path.join(ROOT, "tests", "dist_checks.py"), out))
    assert len(json.loads(out.read_text())) == 7


def test_two_processes_same_weights_and_divisions_on_every_rank(two):
    out, probe = two
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    assert [e["epoch"] for e in ranks[0]["epochs"]] == [0, 1]
    assert ranks[0]["epochs"] == ranks[1]["epochs"]  # nets and optimizer states, bit for bit, after each epoch
    assert ranks[0]["divisions"] == ranks[1]["divisions"] and len(ranks[0]["divisions"]) == 1  # epoch 1
    recs = records(out)
    assert [r["phase"] for r in recs] == ["warmup", "train"]
    assert recs[1]["net1"]["labeled"] + recs[1]["net1"]["unlabeled"] == 33  # every sample once in the division
    config = json.loads(open(os.path.join(out, PREFIX + "_config.json")).read())
    assert config["world_size"] == 2 and config["sync_bn"] is False
    # only rank 0 wrote: one set of files, no second run's leftovers
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == sorted(
        [PREFIX + s for s in ("_acc.txt", "_stats.txt", "_log.jsonl", "_config.json", "_checkpoint.pth.tar",
                              "_checkpoint_prev.pth.tar", "_losses")])


def test_the_division_is_that_of_a_single_process_evaluation_of_the_same_weights(two, data):
    """Epoch 1's division was made from the weights after epoch 0 (the previous checkpoint): evaluating those here,
    in one process, gives the same per-sample losses (the GMM's input), and the logged counts, precision and recall
    are those of the division saved with them."""
    out, _ = two
    checkpoint = torch.load(out / (PREFIX + "_checkpoint_prev.pth.tar"), weights_only=False)
    assert checkpoint["epoch"] == 0
    train_x, clean, test_x, test_y = cifar_files.read_cifar(str(data), "cifar10")
    noisy = json.loads((data / "0.5_sym.json").read_text())
    cifar = dataloader_cifar.CIFARData(train_x, noisy, clean, test_x, test_y, "cifar10", torch.device("cpu"))
    saved = np.load(out / (PREFIX + "_losses") / "epoch_001.npz")
    logged = records(out)[1]
    for k in (1, 2):
        net = ResNet18(num_classes=10, width=8)
        net.load_state_dict(checkpoint["nets"][k - 1])
        losses = normalise_losses(eval_train(net, cifar.eval_loader(64), torch.device("cpu")))
        assert np.allclose(losses.numpy(), saved[f"loss{k}"], atol=1e-5)
        # the division saved beside the log (probabilities stored as float32: AUC would see ties there)
        stats = division_stats(saved[f"prob{k}"], 0.5, cifar.clean_mask)
        for key in ("labeled", "precision", "recall"):
            assert logged[f"net{k}"][key] == pytest.approx(stats[key], abs=1e-6), (k, key)


def test_world_size_one_equals_the_plain_command(data, tmp_path):
    plain = tmp_path / "plain"
    run_script("Train_cifar.py", *cifar_args(data, plain, 1))
    one = tmp_path / "one"
    proc = ok(torchrun(1, "Train_cifar.py", *cifar_args(data, one, 1, "--gpuid", 3)))
    assert "--gpuid 3 is ignored under torchrun" in proc.stdout
    assert_same_run(one, plain)


def test_resume_with_two_processes_continues_exactly(two, data, tmp_path):
    """Also: the same torchrun command gives the same logs (the first part of this run is the fixture's again)."""
    out = tmp_path / "resumed"
    ok(torchrun(2, "Train_cifar.py", *cifar_args(data, out, 0)))
    ok(torchrun(2, "Train_cifar.py", *cifar_args(data, out, 1, "--resume")))
    assert_same_run(out, two[0])


def test_a_two_process_checkpoint_continues_in_one_process(two, data, tmp_path):
    out = tmp_path / "one"
    proc = run_script("Train_cifar.py", *cifar_args(data, out, 2), "--resume",
                      two[0] / (PREFIX + "_checkpoint.pth.tar"))
    assert "written by 2 process(es), this run has 1" in proc.stdout
    assert [r["epoch"] for r in records(out)] == [0, 1, 2]
    assert records(out)[:2] == records(two[0])


def test_a_batch_that_does_not_split_is_refused(data, tmp_path):
    proc = torchrun(2, "Train_cifar.py", *cifar_args(data, tmp_path / "out", 1), "--batch_size", 7)
    assert proc.returncode != 0
    assert "error: --batch_size 7 does not split evenly over 2 processes" in proc.stderr
    # no traceback of the script (torchrun prints its own)
    assert os.path.join(ROOT, "distributed.py") not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_error_rank_0_finds_for_the_job_is_reported_once(data, tmp_path):
    proc = torchrun(2, "Train_cifar.py", *cifar_args(data, tmp_path / "out", 1, "--resume", tmp_path / "none.tar"))
    assert proc.returncode != 0
    assert proc.stderr.count("error: --resume: no checkpoint at") == 1 and "error: rank 1" not in proc.stderr


def test_a_killed_rank_ends_the_job_and_leaves_an_intact_checkpoint(data, tmp_path):
    out = tmp_path / "killed"
    t0 = time.time()
    proc = torchrun(2, *launch("Train_cifar.py"), *cifar_args(data, out, 1), env={"KILL": "1:1"})
    assert proc.returncode != 0 and time.time() - t0 < 120
    assert "rank      : 1 (local_rank: 1)" in proc.stderr and "SIGKILL" in proc.stderr
    checkpoint = out / (PREFIX + "_checkpoint.pth.tar")
    assert verify_checkpoint(str(checkpoint)) is None
    assert torch.load(checkpoint, weights_only=False)["epoch"] in (0, 1)


def test_torchrun_restarts_resume_by_themselves_and_end_as_an_undisturbed_run(two, data, tmp_path):
    out = tmp_path / "restarted"
    # torch's shared rendezvous store would hand the restarted workers the addresses of the attempt before
    proc = ok(torchrun(2, *launch("Train_cifar.py"), *cifar_args(data, out, 1), max_restarts=1,
                       env={"KILL": "1:1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}))
    assert "torchrun restart 1: continuing from the last checkpoint" in proc.stdout
    assert_same_run(out, two[0])


@LARGE_ON_DISK
def test_clothing1m_on_two_processes(tmp_path):
    data = tmp_path / "clothing"
    write_fake_clothing1m(str(data), n_train=50, n_val=15, n_test=13)
    out = tmp_path / "out"
    ok(torchrun(2, "Train_clothing1M.py", "--data_path", data, "--output_dir", out, "--pretrained", "none",
                "--batch_size", 4, "--num_batches", 3, "--image_size", 48, "--num_workers", 0, "--num_epochs", 1))
    lines = (out / "clothing1m.txt").read_text().splitlines()
    assert lines[0].startswith("Validation Epoch:0") and lines[2].startswith("Test Accuracy:")
    recs = [json.loads(x) for x in (out / "clothing1m_log.jsonl").read_text().splitlines()]
    assert [r.get("phase") for r in recs] == ["warmup", "train", "test"]
    assert recs[1]["net1"]["labeled"] + recs[1]["net1"]["unlabeled"] == 12  # a 3 x 4 draw, gathered whole
    # the best-validation weights were kept and tested: accuracies are multiples of 1/15 (val) and 1/13 (test)
    assert round(recs[0]["val_acc1"] * 15 / 100, 6).is_integer()
    assert round(recs[2]["test_acc"] * 13 / 100, 6).is_integer()


@LARGE_ON_DISK
def test_webvision_on_two_processes(tmp_path):
    data = tmp_path / "webvision"
    write_fake_webvision(str(data), n_train=7, n_val=7, n_imagenet=6)
    out = tmp_path / "out"
    ok(torchrun(2, "Train_webvision.py", "--data_path", data, "--output_dir", out, "--batch_size", 4,
                "--image_size", 107, "--num_workers", 0, "--num_epochs", 1))
    recs = [json.loads(x) for x in (out / "webvision_log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in recs] == ["warmup", "train"]
    assert recs[1]["net1"]["labeled"] + recs[1]["net1"]["unlabeled"] == 7
    for r in recs:  # top-1 and top-5 of 7 WebVision and 6 ImageNet images, gathered whole
        assert round(r["webvision_top5"] * 7 / 100, 6).is_integer()
        assert round(r["imagenet_top5"] * 6 / 100, 6).is_integer()


def test_bench_reports_scaling_against_one_process():
    proc = ok(torchrun(2, "bench.py", "--device", "cpu", "--num_train", 32, "--num_test", 16, "--batch_size", 8,
                       "--eval_batch_size", 16, "--epochs", 1, "--net_width", 8))
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["world_size"] == 2 and report["device"] == "cpu"
    for phase in ("warmup", "eval", "gmm", "train1", "train2", "test"):
        one = report["one_process"]["phases"][phase]["images_per_s"]
        many = report["n_processes"]["phases"][phase]["images_per_s"]
        assert one > 0 and many > 0 and abs(report["efficiency"][phase] - many / (2 * one)) < 1e-9
    assert report["epoch_efficiency"] > 0


def test_successor_options_keep_every_rank_equal(data, tmp_path):
    """Class-wise division, the kNN filter and mixed embeddings (two forwards before one backward under DDP) leave
    every rank with the same weights, optimizer states and divisions."""
    probe = tmp_path / "probe"
    probe.mkdir()
    ok(torchrun(2, *launch("Train_cifar.py"),
                *cifar_args(data, tmp_path / "run", 2, "--division", "classwise", "--ood_filter", "knn", "--ood_k",
                            "3", "--ood_interval", "1", "--mix", "input+embedding"), env={"PROBE": str(probe)}))
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    assert [e["epoch"] for e in ranks[0]["epochs"]] == [0, 1, 2]
    assert ranks[0]["epochs"] == ranks[1]["epochs"] and ranks[0]["divisions"] == ranks[1]["divisions"]
    assert [d["epoch"] for d in ranks[0]["divisions"]] == [1, 2]  # both co-divide epochs, both nets' divisions
