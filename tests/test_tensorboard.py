"""--tensorboard: the events read back with tensorboard's own reader hold every number of the JSON log, per epoch,
and the clean probabilities of each co-divide; a run stopped and resumed has each epoch once; without the package
the flag is one line and writes nothing."""
import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fake_custom import write_image_folder
from prestarted import COMMAND as PRESTARTED
from runs import CIFAR_FAST, CUSTOM_FAST, PREFIX, ROOT, run_script, script_command
import tensorboard_log

pytestmark = pytest.mark.slow  # every test here starts training processes


def events(out, prefix):
    """The run's events, read back whole."""
    reader = EventAccumulator(tensorboard_log.log_dir(str(out), prefix), size_guidance={"scalars": 0, "histograms": 0})
    reader.Reload()
    return reader


def logged(out, log_name):
    """The epoch records of a JSON log."""
    with open(os.path.join(out, log_name)) as f:
        return [r for r in map(json.loads, f) if "epoch" in r]


def assert_events_equal_log(reader, records):
    """Every number of every epoch record is a scalar of that epoch's step, and nothing else is, each step once."""
    expected = {}
    for record in records:
        for tag, value in tensorboard_log.scalars(record).items():
            expected.setdefault(tag, []).append((record["epoch"], value))
    assert sorted(reader.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        got = [(s.step, s.value) for s in reader.Scalars(tag)]
        assert [step for step, _ in got] == [step for step, _ in points], tag
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(got, points)), tag


def test_cifar_events_equal_the_json_log_and_a_resumed_run_has_each_epoch_once(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = ["--data_path", tiny_data("cifar"), "--output_dir", out, "--num_epochs", 2, *CIFAR_FAST, "--tensorboard"]
    # the checkpoint of epoch 1 cannot be written (an injected full disk): its events are written, then purged
    proc = subprocess.run(script_command("tests/fault_launch.py", os.path.join(ROOT, "Train_cifar.py"), *args),
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "FAULT": "enospc:2"})
    assert proc.returncode == 2 and "the checkpoint of epoch 0" in proc.stderr
    assert [s.step for s in events(out, PREFIX).Scalars("test_acc")] == [0, 1]
    run_script("Train_cifar.py", *args, "--resume")
    reader = events(out, PREFIX)
    records = logged(out, f"{PREFIX}_log.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert_events_equal_log(reader, records)
    assert {"net1/Lx", "net2/Lu", "net1/lambda", "net1/labeled", "net1/auc", "net1/precision", "net1/recall", "lr",
            "test_acc", "time/train1", "seconds"} <= set(reader.Tags()["scalars"])
    for net in ("net1", "net2"):  # the co-divide epochs: every training image's clean probability
        histograms = reader.Histograms(f"{net}/clean_prob")
        assert [h.step for h in histograms] == [1, 2] and all(h.histogram_value.num == 64 for h in histograms)


def test_custom_and_pretraining_write_their_events(tmp_path):
    data = tmp_path / "data"
    write_image_folder(str(data), n_train=5, n_test=2)
    out = tmp_path / "custom"
    run_script("Train_custom.py", "--data_path", data, "--output_dir", out, *CUSTOM_FAST, "--num_epochs", 1,
               "--tensorboard")
    assert_events_equal_log(events(out, "custom"), logged(out, "custom_log.jsonl"))
    out = tmp_path / "pre"
    run_script("Pretrain_simclr.py", "--dataset", "custom", "--data_path", data, "--output_dir", out, "--epochs", 2,
               "--batch_size", 5, "--net_width", 8, "--image_size", 16, "--num_workers", 0, "--tensorboard")
    reader = events(out, "simclr_imagefolder")
    assert_events_equal_log(reader, logged(out, "simclr_imagefolder_log.jsonl"))
    assert {"loss", "knn_acc", "lr", "time/train"} <= set(reader.Tags()["scalars"])


def test_without_the_package_the_flag_is_one_line_and_writes_nothing(tiny_data, tmp_path):
    out = tmp_path / "run"
    hide = ("import runpy, sys; sys.modules['torch.utils.tensorboard'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    cmd = [sys.executable, PRESTARTED, "-c", hide, os.path.join(ROOT, "Train_cifar.py"), "--data_path",
           tiny_data("cifar"), "--output_dir", str(out), "--num_epochs", "0", *map(str, CIFAR_FAST), "--tensorboard"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {tensorboard_log.MISSING}"]
    assert not out.exists()
