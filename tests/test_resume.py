"""Resume identity, for every training script: a run stopped after epoch 1 and resumed ends as the undisturbed run,
bit for bit (logs, checkpoint, best weights, saved losses)."""
import pytest

from runs import SCRIPTS, assert_same_run, run_script


@pytest.mark.slow
@pytest.mark.parametrize("key", SCRIPTS)
def test_a_resumed_run_ends_as_the_undisturbed_one(key, tiny_data, undisturbed, tmp_path):
    script, _, args = SCRIPTS[key]
    reference, _ = undisturbed(key)
    common = ["--data_path", tiny_data(key), "--output_dir", tmp_path, *args]
    run_script(script, *common, "--num_epochs", 1)  # stopped after epoch 1 (its test line, if any, is cut at resume)
    proc = run_script(script, *common, "--num_epochs", 2, "--resume")
    assert "resumed from epoch 1" in proc.stdout
    assert_same_run(reference, str(tmp_path))
