"""Noise injection: identical to the original code's output, linear time, noise files validated."""
import hashlib
import json
import os
import time

import pytest

from dataloader_cifar import inject_noise, load_or_create_noise, noise_file_path
from utils import UserError

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
