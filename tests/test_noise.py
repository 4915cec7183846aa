"""Noise injection: identical to the original code's output, linear time, noise files validated."""
import hashlib
import json
import math
import os
import time

import numpy as np
import pytest

from cifar_files import read_cifar
from cli import UserError
from noise import (asym_transition, check_noise_fits, expected_changes, get_args_parser, inject_noise,
                   load_or_create_noise, noise_file_path, noise_seed, validate_setting)
from noise import main as noise_main
from presets import ratio_text

VECTORS = json.load(open(os.path.join(os.path.dirname(__file__), "reference_noise_vectors.json")))["vectors"]


def _parse(key):
    """'cifar10_sym_0.5_seed123' -> (num_class, mode, r, seed)."""
    dataset, mode, r, seed = key.split("_")
    return (10 if dataset == "cifar10" else 100), mode, float(r), int(seed[len("seed"):])


@pytest.mark.parametrize("key", sorted(VECTORS))
def test_reference_vectors(key):
    num_class, mode, r, seed = _parse(key)
    clean = [i % num_class for i in range(50000)]
    noisy = inject_noise(clean, r, mode, num_class, seed)
    ref = VECTORS[key]
    assert noisy[:12] == ref["head"]
    assert sum(a != b for a, b in zip(noisy, clean)) == ref["n_changed"]
    assert hashlib.sha256(json.dumps(noisy).encode()).hexdigest() == ref["sha256"]


def test_all_eighteen_vectors_present():
    assert len(VECTORS) == 18


def test_noise_is_linear_time():
    clean = [i % 10 for i in range(50000)]
    t0 = time.perf_counter()
    inject_noise(clean, 0.9, "sym", 10, 7)
    assert time.perf_counter() - t0 < 1.0


def test_sym_rate_and_asym_mapping():
    clean = [i % 10 for i in range(20000)]
    sym = inject_noise(clean, 0.5, "sym", 10, 1)
    changed = sum(a != b for a, b in zip(sym, clean)) / len(clean)
    assert abs(changed - 0.5 * 9 / 10) < 0.02  # uniform over all classes keeps the true label 1/C of the time
    asym = inject_noise(clean, 0.4, "asym", 10, 1)
    mapping = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    for y, z in zip(clean, asym):
        assert z == y or z == mapping[y]
    flipped = sum(a != b for a, b in zip(asym, clean))
    assert flipped == pytest.approx(0.4 * 0.5 * len(clean), rel=0.05)  # half the classes have a mapping


def test_zero_noise_keeps_labels():
    clean = [i % 10 for i in range(1000)]
    assert inject_noise(clean, 0.0, "sym", 10, 3) == clean


def test_noise_file_written_then_reused(tmp_path):
    clean = [i % 10 for i in range(500)]
    path = noise_file_path(str(tmp_path), 0.5, "sym")
    assert os.path.basename(path) == "0.5_sym.json"
    labels, created = load_or_create_noise(path, clean, 0.5, "sym", 10, 123)
    assert created and json.load(open(path)) == labels
    # an existing file wins over the seed, so noise files of the original code are interchangeable
    again, created = load_or_create_noise(path, clean, 0.5, "sym", 10, 999)
    assert not created and again == labels


def test_noise_file_wrong_length(tmp_path):
    path = tmp_path / "0.5_sym.json"
    path.write_text(json.dumps([0] * 10))
    with pytest.raises(UserError, match="has 10 labels but the training set has 20"):
        load_or_create_noise(str(path), [0] * 20, 0.5, "sym", 10, 1)


def test_noise_file_out_of_range(tmp_path):
    path = tmp_path / "0.5_sym.json"
    path.write_text(json.dumps([0] * 19 + [57]))
    with pytest.raises(UserError, match="outside 0..9"):
        load_or_create_noise(str(path), [0] * 20, 0.5, "sym", 10, 1)
    assert json.loads(path.read_text())[-1] == 57  # nothing overwritten


# ----------------------------------------------------------------------------- names and reuse checks

@pytest.mark.parametrize("r,name", [(0.5, "0.5_sym.json"), (0.3, "0.3_sym.json"), (0.0, "0.0_sym.json"),
                                    (1.0, "1.0_sym.json"), (0.45, "0.45_sym.json"), (0.54, "0.54_sym.json"),
                                    (0.35, "0.35_sym.json"), (0.125, "0.125_sym.json"), (1e-5, "0.00001_sym.json")])
def test_noise_file_names(r, name):
    """One-decimal r keeps the original's name; any other r has all its digits, so 0.45 and 0.54 are not 0.5."""
    assert os.path.basename(noise_file_path("d", r, "sym")) == name
    assert float(ratio_text(r)) == r


def test_run_prefix_follows_the_same_rule():
    from presets import run_prefix
    for r, text in ((0.5, "0.5"), (0.3, "0.3"), (0.35, "0.35"), (0.0, "0.0"), (0.1 + 0.2, "0.30000000000000004")):
        assert run_prefix("cifar10", r, "sym") == f"cifar10_{text}_sym"
    assert run_prefix("cifar10", None, "worst") == "cifar10_worst"
    assert run_prefix("cifar100", 0.45, "idn", 0.2) == "cifar100_0.45_idn_ood0.2"


def test_r_045_gets_its_own_file_next_to_05(tmp_path):
    clean = [i % 10 for i in range(2000)]
    half, _ = load_or_create_noise(noise_file_path(str(tmp_path), 0.5, "sym"), clean, 0.5, "sym", 10, 1)
    path = noise_file_path(str(tmp_path), 0.45, "sym")
    labels, created = load_or_create_noise(path, clean, 0.45, "sym", 10, 1)
    assert created and labels != half and sorted(os.listdir(tmp_path)) == ["0.45_sym.json", "0.5_sym.json"]


def _clean(dataset, n=50000):
    """Synthetic clean labels as in the reference vectors: i % C."""
    return [i % (10 if dataset == "cifar10" else 100) for i in range(n)]


GENUINE = [("cifar10", "sym", r) for r in (0.0, 0.2, 0.5, 0.8, 0.9, 1.0)] + \
          [("cifar10", "asym", r) for r in (0.1, 0.4, 0.5, 1.0)] + \
          [("cifar100", "sym", r) for r in (0.2, 0.5, 0.8, 0.9)]


@pytest.mark.parametrize("dataset,mode,r", GENUINE)
def test_files_of_the_original_code_are_accepted(tmp_path, dataset, mode, r):
    """Integer seeds and the original's string seeds (its --seed had no type), as its dataloader wrote them."""
    clean = _clean(dataset)
    num_class = 10 if dataset == "cifar10" else 100
    path = tmp_path / "noise.json"
    for seed in (123, 1, 7, "123", "1"):
        path.write_text(json.dumps(inject_noise(clean, r, mode, num_class, seed)))
        labels, created = load_or_create_noise(str(path), clean, r, mode, num_class, 0)
        assert not created


def test_files_on_tiny_training_sets_are_accepted(tmp_path):
    path = tmp_path / "noise.json"
    for n in (3, 20, 64):
        clean = [i % 10 for i in range(n)]
        for mode in ("sym", "asym"):
            for r in (0.1, 0.5, 0.9, 1.0):
                for seed in range(40):
                    path.write_text(json.dumps(inject_noise(clean, r, mode, 10, seed)))
                    load_or_create_noise(str(path), clean, r, mode, 10, 0)


def test_a_file_of_another_r_is_refused(tmp_path):
    """The original named r = 0.45 and r = 0.5 both 0.5_sym.json: such a file no longer passes for 0.5."""
    clean = _clean("cifar10")
    path = tmp_path / "0.5_sym.json"
    path.write_text(json.dumps(inject_noise(clean, 0.45, "sym", 10, 123)))
    before = path.read_text()
    with pytest.raises(UserError) as info:
        load_or_create_noise(str(path), clean, 0.5, "sym", 10, 123)
    message = str(info.value)
    assert f"noise file {path} does not fit --r 0.5 --noise_mode sym" in message
    assert "0.4057 of its labels differ from the clean ones where 0.4500 +- 0.0057 are expected" in message
    assert "(it looks made with --r 0.45)" in message
    assert "delete it to regenerate" in message and "--noise_file" in message
    assert path.read_text() == before
    for r in (0.49, 0.51):  # a hundredth of r apart is already told apart on 50,000 labels
        with pytest.raises(UserError, match="does not fit"):
            load_or_create_noise(str(path), clean, r, "sym", 10, 123)


def test_cifar100_rates_are_told_apart(tmp_path):
    clean = _clean("cifar100")
    path = tmp_path / "0.5_sym.json"
    path.write_text(json.dumps(inject_noise(clean, 0.5, "sym", 100, 1)))
    load_or_create_noise(str(path), clean, 0.5, "sym", 100, 1)
    for r in (0.495, 0.505):
        with pytest.raises(UserError, match="does not fit --r"):
            load_or_create_noise(str(path), clean, r, "sym", 100, 1)


def test_asym_file_checks_the_class_map_and_the_mode(tmp_path):
    clean = _clean("cifar10")
    asym = inject_noise(clean, 0.4, "asym", 10, 123)
    path = tmp_path / "0.4_asym.json"
    path.write_text(json.dumps(asym))
    load_or_create_noise(str(path), clean, 0.4, "asym", 10, 123)
    with pytest.raises(UserError, match=r"does not fit --r 0.4 --noise_mode sym: 0.1997 of its labels"):
        load_or_create_noise(str(path), clean, 0.4, "sym", 10, 123)  # an asym file reused as sym
    with pytest.raises(UserError, match="does not fit --r 0.5 --noise_mode asym"):
        load_or_create_noise(str(path), clean, 0.5, "asym", 10, 123)
    off_map = list(asym)
    off_map[0] = 5  # clean class 0 never changes under the asymmetric map
    path.write_text(json.dumps(off_map))
    with pytest.raises(UserError, match="changes label 0 from class 0 to 5, which the asymmetric map"):
        load_or_create_noise(str(path), clean, 0.4, "asym", 10, 123)
    path.write_text(json.dumps(inject_noise(clean, 0.4, "sym", 10, 123)))
    with pytest.raises(UserError, match="so it is no asym noise file"):
        load_or_create_noise(str(path), clean, 0.4, "asym", 10, 123)


def test_expected_changes():
    mean, sd = expected_changes(_clean("cifar10"), 0.5, "sym", 10)
    assert mean == 22500 and sd == pytest.approx(math.sqrt(25000 * 0.9 * 0.1))
    mean, sd = expected_changes(_clean("cifar10"), 0.4, "asym", 10)  # half the classes are mapped
    assert mean == 10000 and sd == pytest.approx(math.sqrt(20000 * 0.25 * 30000 / 49999))
    for key, ref in VECTORS.items():  # the original's counts lie well inside the tolerance
        num_class, mode, r, _ = _parse(key)
        mean, sd = expected_changes(_clean("cifar10" if num_class == 10 else "cifar100"), r, mode, num_class)
        assert abs(ref["n_changed"] - mean) < 2 * sd


@pytest.mark.parametrize("content,shown", [([0.0, 1.0] * 10, "0.0"), ([True] * 20, "true"), (["3"] * 20, '"3"'),
                                           ([1] * 19 + [None], "null")])
def test_noise_file_of_non_integers(tmp_path, content, shown):
    path = tmp_path / "0.5_sym.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError, match=rf"holds non-integer values \(e.g. {shown}\)"):
        load_or_create_noise(str(path), [i % 10 for i in range(20)], 0.5, "sym", 10, 1)


def test_cifar100_asym_flips_to_the_next_class_of_its_block_of_five(tmp_path):
    validate_setting("cifar100", 0.4, "asym")
    table = asym_transition("cifar100")
    assert [table[c] for c in range(10)] == [1, 2, 3, 4, 0, 6, 7, 8, 9, 5] and table[99] == 95 and len(table) == 100
    assert asym_transition("cifar10") == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    clean = [i % 100 for i in range(50000)]
    noisy = inject_noise(clean, 0.4, "asym", 100, 123, table)
    changed = [(c, y) for c, y in zip(clean, noisy) if c != y]
    assert len(changed) == 20000  # every class moves: exactly int(r * N) labels
    assert all(y == c - c % 5 + (c + 1) % 5 for c, y in changed)
    per_class = np.bincount([c for c, _ in changed], minlength=100) / 500
    assert abs(per_class.mean() - 0.4) < 1e-12 and per_class.min() > 0.3 and per_class.max() < 0.5
    assert noisy == inject_noise(clean, 0.4, "asym", 100, 123, table)  # seeded
    # the file written is accepted when reused, and a CIFAR-10 asym file is no CIFAR-100 one
    path = str(tmp_path / "0.4_asym.json")
    assert load_or_create_noise(path, clean, 0.4, "asym", 100, 123, table) == (noisy, True)
    assert load_or_create_noise(path, clean, 0.4, "asym", 100, 9, table) == (noisy, False)
    with pytest.raises(UserError, match="asymmetric map"):
        check_noise_fits(path, noisy, clean, 0.4, "asym", 100)
    validate_setting("cifar10", 0.4, "asym")


def test_noise_command_writes_exact_names(tmp_path, capsys):
    from fake_cifar import write_fake_cifar
    write_fake_cifar(str(tmp_path), "cifar10", n_train=50, n_test=10)
    args = get_args_parser().parse_args(["--data_path", str(tmp_path), "--r", "0.45"])
    noise_main(args)
    assert "0.45_sym.json (written)" in capsys.readouterr().out
    noise_main(args)
    assert "0.45_sym.json (reused)" in capsys.readouterr().out
    assert not (tmp_path / "0.5_sym.json").exists()


STRING_SEED_VECTORS = json.load(open(os.path.join(os.path.dirname(__file__),
                                                  "reference_noise_vectors_string_seed.json")))["vectors"]


@pytest.mark.parametrize("key", sorted(STRING_SEED_VECTORS))
def test_legacy_string_seed_reproduces_the_originals_explicit_seed(key):
    dataset, mode, r, seed = key.split("_")
    num_class = 10 if dataset == "cifar10" else 100
    clean = [i % num_class for i in range(50000)]
    noisy = inject_noise(clean, float(r), mode, num_class, noise_seed(int(seed[len("seedstr"):]), True))
    ref = STRING_SEED_VECTORS[key]
    assert noisy[:20] == ref["head"]
    assert sum(a != b for a, b in zip(noisy, clean)) == ref["n_changed"]
    assert hashlib.sha256(json.dumps(noisy).encode()).hexdigest() == ref["sha256"]
    # off by default: the integer seed, whose labels differ
    assert inject_noise(clean, float(r), mode, num_class, noise_seed(int(seed[len("seedstr"):]))) != noisy


def test_noise_command_and_train_cifar_take_legacy_string_seed(tmp_path):
    from fake_cifar import write_fake_cifar
    import Train_cifar
    write_fake_cifar(str(tmp_path), "cifar10", n_train=200, n_test=10)
    noise_main(get_args_parser().parse_args(["--data_path", str(tmp_path), "--seed", "7", "--legacy_string_seed"]))
    labels = json.load(open(noise_file_path(str(tmp_path), 0.5, "sym")))
    clean = [int(y) for y in read_cifar(str(tmp_path), "cifar10")[1]]
    assert labels == inject_noise(clean, 0.5, "sym", 10, "7") != inject_noise(clean, 0.5, "sym", 10, 7)
    args = Train_cifar.get_args_parser().parse_args(["--seed", "7", "--legacy_string_seed"])
    assert args.legacy_string_seed and noise_seed(args.seed, args.legacy_string_seed) == "7"
    assert not Train_cifar.get_args_parser().parse_args([]).legacy_string_seed
