"""Resume identity, for every training script: a run stopped after epoch 1 and resumed ends as the undisturbed run,
bit for bit (logs, checkpoint, best weights, saved losses)."""
import shutil

import pytest

from runs import LARGE_ON_DISK, SCRIPTS, assert_same_run, run_contents, run_script


@pytest.mark.slow
@pytest.mark.parametrize("key", [pytest.param(key, marks=() if key == "cifar" else LARGE_ON_DISK)
                                 for key in SCRIPTS])
def test_a_resumed_run_ends_as_the_undisturbed_one(key, tiny_data, undisturbed, tmp_path):
    script, _, args = SCRIPTS[key]
    if key == "cifar":  # the session's, which test_faults and test_train_cifar compare against too
        reference = undisturbed(key)[0]
    else:  # needed here only: made here and kept as its contents, so that one run's checkpoints are on disk at a time
        folder = tmp_path / "undisturbed"
        run_script(script, "--data_path", tiny_data(key), "--output_dir", folder, "--num_epochs", 2, *args)
        reference = run_contents(folder)
        shutil.rmtree(folder)
    out = tmp_path / "resumed"
    common = ["--data_path", tiny_data(key), "--output_dir", out, *args]
    run_script(script, *common, "--num_epochs", 1)  # stopped after epoch 1 (its test line, if any, is cut at resume)
    proc = run_script(script, *common, "--num_epochs", 2, "--resume")
    assert "resumed from epoch 1" in proc.stdout
    assert_same_run(reference, out)
