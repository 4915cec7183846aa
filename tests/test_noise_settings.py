"""The newer noise settings: CIFAR-N's human labels, instance-dependent noise and open-set noise."""
import hashlib
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from cifar_files import read_cifar
from cli import UserError
from dataloader_cifar import CIFARData
from fake_cifar import write_fake_cifar
import noise
from noise import (CIFARN_KEYS, check_noise_fits, choose_replacement, expected_changes, get_args_parser,
                   idn_flip_distribution, instance_noise, load_or_create_noise, load_or_create_replacement,
                   read_cifarn, read_ood_source, validate_setting)
from noise import main as noise_main
from runs import LARGE_ON_DISK, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_cifarn(path, clean, dataset="cifar10", seed=0, rate=0.4):
    """A file in the CIFAR-N release's format: a torch.save'd dict of numpy int64 label arrays; returns it."""
    rng = np.random.default_rng(seed)
    clean = np.asarray(clean, dtype=np.int64)
    num_class = 10 if dataset == "cifar10" else 100

    def noisy():
        """clean labels, a fraction `rate` of them redrawn."""
        labels = clean.copy()
        flip = rng.random(len(clean)) < rate
        labels[flip] = (labels[flip] + rng.integers(1, num_class, int(flip.sum()))) % num_class
        return labels

    if dataset == "cifar10":
        content = {"clean_label": clean, **{CIFARN_KEYS[m]: noisy() for m in ("aggre", "worst", "rand1", "rand2",
                                                                             "rand3")}}
    else:
        content = {"clean_label": clean, "noisy_label": noisy(), "noisy_coarse_label": [0] * len(clean),
                   "clean_coarse_label": [0] * len(clean)}
    torch.save(content, path)
    return content


def as_numpy1_file(path):
    """Rewrite a torch.save'd file so its pickle names numpy's arrays as numpy 1 did (the release's files do)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(path) as old, zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as new:
        for item in old.infolist():
            data = old.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            new.writestr(item, data)
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


def args_of(*argv):
    """The noise command's arguments, with --r's default filled in where it applies."""
    args = get_args_parser().parse_args(list(argv))
    noise.resolve_noise_args(args)
    return args


# ----------------------------------------------------------------------------- CIFAR-N

@pytest.mark.parametrize("numpy1", [False, True])
def test_cifarn_labels_come_from_their_keys(tmp_path, numpy1):
    clean = np.arange(200) % 10
    path = str(tmp_path / "CIFAR-10_human.pt")
    content = write_cifarn(path, clean)
    if numpy1:
        as_numpy1_file(path)
    for mode in ("aggre", "worst", "rand1", "rand2", "rand3"):
        labels = read_cifarn(path, mode, clean, 10)
        assert labels == content[CIFARN_KEYS[mode]].tolist()
    assert read_cifarn(path, "worst", clean, 10) == content["worse_label"].tolist()  # the key's spelling


def test_cifar100n_file_with_coarse_lists(tmp_path):
    clean = np.arange(300) % 100
    path = str(tmp_path / "CIFAR-100_human.pt")
    content = write_cifarn(path, clean, "cifar100")
    assert read_cifarn(path, "noisy100", clean, 100) == content["noisy_label"].tolist()


def test_cifarn_file_of_another_order_is_refused(tmp_path):
    clean = np.arange(200) % 10
    path = str(tmp_path / "CIFAR-10_human.pt")
    write_cifarn(path, np.roll(clean, 1))
    with pytest.raises(UserError, match="clean_label differs from the training labels.*another data set or order"):
        read_cifarn(path, "worst", clean, 10)
    write_cifarn(path, clean[:150])
    with pytest.raises(UserError, match="not 200 integer labels"):
        read_cifarn(path, "worst", clean, 10)


class Payload:
    """A pickled object other than labels: weights-only loading must refuse to build it."""

    def __reduce__(self):
        """Rebuilt by calling os.getcwd: harmless, but arbitrary code all the same."""
        return (os.getcwd, ())


def test_cifarn_file_is_not_unpickled_freely(tmp_path):
    clean = np.arange(20) % 10
    path = str(tmp_path / "CIFAR-10_human.pt")
    torch.save({"clean_label": clean, "worse_label": clean, "extra": Payload()}, path)
    with pytest.raises(UserError, match="cannot be loaded as a CIFAR-N file with weights-only loading"):
        read_cifarn(path, "worst", clean, 10)
    torch.save({"clean_label": clean}, path)
    with pytest.raises(UserError, match="holds no 'worse_label'"):
        read_cifarn(path, "worst", clean, 10)
    with pytest.raises(UserError, match="CIFAR-N file .* not found: put CIFAR-10_human.pt"):
        read_cifarn(str(tmp_path / "absent.pt"), "worst", clean, 10)


@pytest.mark.parametrize("argv, message", [
    (["--noise_mode", "worst", "--r", "0.4"], "--r does not apply to CIFAR-N"),
    (["--noise_mode", "noisy100"], "labels of cifar100, not cifar10: use --dataset cifar100"),
    (["--dataset", "cifar100", "--noise_mode", "aggre"], "labels of cifar10, not cifar100"),
    (["--noise_mode", "worst", "--noise_file", "x.json"], "--noise_file does not apply to CIFAR-N"),
    (["--noise_mode", "idn", "--legacy_string_seed"], "--legacy_string_seed reproduces the original's sym and asym"),
    (["--ood_ratio", "0.2"], "--ood_ratio 0.2 needs --ood_path"),
    (["--ood_path", "x"], "--ood_path without --ood_ratio"),
    (["--ood_ratio", "1", "--ood_path", "x"], "would replace every training image"),
    (["--r", "0.9", "--ood_ratio", "0.2", "--ood_path", "x"], r"more noisy labels than images left"),
])
def test_flags_that_do_not_go_together(argv, message):
    with pytest.raises(UserError, match=message):
        args_of(*argv)


def test_unknown_noise_mode_is_refused_by_the_parser(capsys):
    """An unknown mode stops at parse time, one line; validate_setting still refuses it for callers without one."""
    with pytest.raises(SystemExit) as info:
        args_of("--noise_mode", "nonsense")
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: unknown --noise_mode 'nonsense': use one of sym, asym, idn")
    with pytest.raises(UserError, match="unknown --noise_mode 'nonsense'"):
        validate_setting("cifar10", 0.5, "nonsense")


def test_cifarn_modes_have_no_r_and_others_default_to_half():
    assert args_of("--noise_mode", "worst").r is None
    assert args_of("--noise_mode", "idn").r == 0.5
    validate_setting("cifar10", 0.5, "sym")  # the paper's settings as before


# ----------------------------------------------------------------------------- instance-dependent noise

# Digests of the labels that Xia et al.'s published generator makes, as InstanceGM's CIFAR loader calls it: that
# code itself was run (on the CPU) on the images and clean labels the file describes; see its "what".
IDN_REFERENCE = json.load(open(os.path.join(os.path.dirname(__file__), "reference_noise_vectors_idn.json")))


def idn_reference_images():
    """The reference file's training images: 50,000 CIFAR rows of seeded random pixels, as N x 3 x 32 x 32."""
    return np.random.RandomState(2020).randint(0, 256, (50000, 3072), dtype=np.uint8).reshape(50000, 3, 32, 32)


def _idn_case(key):
    """'cifar100_idn_0.4_seed123' -> (dataset, num_class, r, seed)."""
    dataset, _, r, seed = key.split("_")
    return dataset, 10 if dataset == "cifar10" else 100, float(r), int(seed[len("seed"):])


def _digest(labels):
    """The reference files' digest: sha256 of the json.dumps()-ed label list."""
    return hashlib.sha256(json.dumps([int(y) for y in labels]).encode()).hexdigest()


@pytest.fixture(scope="module")
def idn_images():
    """The reference images, made once for the module."""
    return idn_reference_images()


@pytest.mark.parametrize("key", sorted(IDN_REFERENCE["vectors"]))
def test_idn_equals_the_published_generator(idn_images, key):
    _, num_class, r, seed = _idn_case(key)
    clean = np.arange(50000) % num_class
    labels = instance_noise(idn_images, clean, r, num_class, seed)
    ref = IDN_REFERENCE["vectors"][key]
    assert labels[:12].tolist() == ref["head"]
    assert int((labels != clean).sum()) == ref["n_changed"]
    assert _digest(labels) == ref["sha256"]


def test_idn_reference_set_covers_both_data_sets_and_seeds():
    cases = [_idn_case(k) for k in IDN_REFERENCE["vectors"]]
    assert {c[0] for c in cases} == {"cifar10", "cifar100"} and {c[3] for c in cases} == {7, 123}
    assert {c[2] for c in cases if c[0] == "cifar100"} >= {0.2, 0.4, 0.5}


@LARGE_ON_DISK  # a CIFAR-100 training file of 50,000 images
def test_noise_command_writes_the_published_idn_labels(tmp_path, idn_images):
    # end to end: CIFAR-100's file as the data set ships it, read back, the default --seed, the usual file name
    rows = idn_images.reshape(50000, 3072)
    with open(tmp_path / "train", "wb") as f:
        pickle.dump({"data": rows, "fine_labels": (np.arange(50000) % 100).tolist()}, f, protocol=2)
    with open(tmp_path / "test", "wb") as f:
        pickle.dump({"data": rows[:10], "fine_labels": list(range(10))}, f, protocol=2)
    noise_main(get_args_parser().parse_args(["--dataset", "cifar100", "--data_path", str(tmp_path), "--r", "0.4",
                                             "--noise_mode", "idn"]))
    labels = json.load(open(tmp_path / "0.4_idn.json"))
    assert _digest(labels) == IDN_REFERENCE["vectors"]["cifar100_idn_0.4_seed123"]["sha256"]


@pytest.mark.parametrize("num_class, r", [(10, 0.4), (100, 0.3)])
def test_idn_rate_on_50000_images(idn_images, num_class, r):
    clean = np.arange(50000) % num_class
    labels = instance_noise(idn_images, clean, r, num_class, 123)
    assert labels.shape == (50000,) and labels.min() >= 0 and labels.max() < num_class
    assert abs(np.mean(labels != clean) - r) < 0.01
    # every class receives flips from the others: the noise is not one fixed map
    flipped = labels[labels != clean]
    assert len(np.unique(flipped)) == num_class


def test_idn_depends_on_the_image_and_is_seeded():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2000, 3, 32, 32), dtype=np.uint8)
    clean = np.arange(2000) % 10
    a, b = instance_noise(images, clean, 0.4, 10, 7), instance_noise(images, clean, 0.4, 10, 7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, instance_noise(images, clean, 0.4, 10, 8))
    # two copies of one image with one true class score the other classes alike: when both flip, to the same class
    twin = np.concatenate([images[:1]] * 2000)
    same = instance_noise(twin, np.zeros(2000, dtype=np.int64), 0.9, 10, 3)
    assert len(np.unique(same[same != 0])) == 1


def test_idn_expected_changes_and_file_check(tmp_path):
    assert idn_flip_distribution(0.5).mean() == pytest.approx(0.5)
    assert idn_flip_distribution(0.05).mean() > 0.05  # the cut at 0 lifts the mean
    assert idn_flip_distribution(0.4).support() == (0, 1) and idn_flip_distribution(0.4).std() < 0.1
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (5000, 3, 32, 32), dtype=np.uint8)
    clean = (np.arange(5000) % 10).tolist()
    mean, sd = expected_changes(clean, 0.4, "idn", 10)
    assert mean == pytest.approx(5000 * idn_flip_distribution(0.4).mean()) and sd > 0
    path = str(tmp_path / "0.4_idn.json")
    labels, created = load_or_create_noise(path, clean, 0.4, "idn", 10, 5, images=images)
    assert created and json.load(open(path)) == labels
    again, created = load_or_create_noise(path, clean, 0.4, "idn", 10, 99, images=images)
    assert not created and again == labels
    with pytest.raises(UserError, match="does not fit --r 0.2 --noise_mode idn"):
        check_noise_fits(path, labels, clean, 0.2, "idn", 10)


# ----------------------------------------------------------------------------- open-set noise

@pytest.fixture(scope="module")
def cifar_pair(tmp_path_factory):
    """Fake CIFAR-10 (training set) and CIFAR-100 (its open-set source) folders."""
    root = tmp_path_factory.mktemp("pair")
    write_fake_cifar(str(root / "c10"), "cifar10", n_train=200, n_test=20)
    write_fake_cifar(str(root / "c100"), "cifar100", n_train=300, n_test=20, seed=5)
    return root


def test_open_set_sources(cifar_pair, tmp_path):
    c100 = read_ood_source(str(cifar_pair / "c100"), "cifar10")
    assert c100.shape == (300, 3, 32, 32) and c100.dtype == np.uint8
    assert np.array_equal(c100, read_cifar(str(cifar_pair / "c100"), "cifar100")[0])
    hwc = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "ood.npz", images=hwc)
    chw = read_ood_source(str(tmp_path / "ood.npz"), "cifar10")
    assert np.array_equal(chw, hwc.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "bad.npz", images=hwc.astype(np.float32))
    with pytest.raises(UserError, match="float32 .*give an .npz whose `images` array is N x 32 x 32 x 3 uint8"):
        read_ood_source(str(tmp_path / "bad.npz"), "cifar10")
    np.savez(tmp_path / "other.npz", pictures=hwc)
    with pytest.raises(UserError, match="has no `images` array \\(it has: pictures\\)"):
        read_ood_source(str(tmp_path / "other.npz"), "cifar10")
    with pytest.raises(UserError, match="lacks train: give the folder of cifar100's python files"):
        read_ood_source(str(cifar_pair / "c10"), "cifar10")


def test_replacement_is_seeded_saved_and_checked(tmp_path):
    replaced, source = choose_replacement(1000, 0.2, 500, 123)
    assert len(replaced) == len(source) == 200 and len(np.unique(replaced)) == 200 and len(np.unique(source)) == 200
    assert np.all(np.diff(replaced) > 0) and source.max() < 500
    again = choose_replacement(1000, 0.2, 500, 123)
    assert np.array_equal(again[0], replaced) and np.array_equal(again[1], source)
    assert not np.array_equal(choose_replacement(1000, 0.2, 500, 124)[0], replaced)
    with pytest.raises(UserError, match="replaces 200 training images but --ood_path holds 100"):
        choose_replacement(1000, 0.2, 100, 123)
    path = str(tmp_path / "r.json")
    a, b, created = load_or_create_replacement(path, 1000, 0.2, 500, 123, "src")
    assert created and np.array_equal(a, replaced) and np.array_equal(b, source)
    saved = json.load(open(path))
    assert saved["replaced"] == replaced.tolist() and saved["source_index"] == source.tolist()
    a, b, created = load_or_create_replacement(path, 1000, 0.2, 500, 999, "src")  # reused whatever the seed
    assert not created and np.array_equal(a, replaced) and np.array_equal(b, source)
    with pytest.raises(UserError, match="made for --ood_ratio 0.2, not 0.3"):
        load_or_create_replacement(path, 1000, 0.3, 500, 123, "src")
    with pytest.raises(UserError, match="a source of 500 images, --ood_path has 600"):
        load_or_create_replacement(path, 1000, 0.2, 600, 123, "src")


def test_open_set_noise_of_a_run(cifar_pair, capsys):
    data_path, source = str(cifar_pair / "c10"), str(cifar_pair / "c100")
    argv = ["--data_path", data_path, "--r", "0.2", "--ood_ratio", "0.25", "--ood_path", source, "--seed", "4"]
    noise_main(args_of(*argv))
    assert "0.2_sym_ood0.25_replaced.json (written, 50 images)" in capsys.readouterr().out
    images, clean, _, _ = read_cifar(data_path, "cifar10")
    labels = json.load(open(os.path.join(data_path, "0.2_sym_ood0.25.json")))
    replaced = np.asarray(json.load(open(os.path.join(data_path, "0.2_sym_ood0.25_replaced.json")))["replaced"])
    keep = np.ones(200, dtype=bool)
    keep[replaced] = False
    labels = np.asarray(labels)
    assert np.array_equal(labels[~keep], clean[~keep])  # replaced images keep the label of the image they replace
    # in-distribution noise: int(r / (1 - O) * 150) = 50 of the 150 kept images redrawn, 9/10 of them changed
    assert abs(int(np.sum(labels[keep] != clean[keep])) - 45) <= 12
    # the same command again reuses both files; the run's labels and images follow from them
    args = args_of(*argv)
    again = noise.make_noise(args, images, clean, 10, 300)
    assert again[0] == labels.tolist() and np.array_equal(again[1], replaced)
    assert "(reused, 50 images)" in again[3] and "noise file" in again[3]
    data = CIFARData(images, labels, clean, images[:4], clean[:4], "cifar10", torch.device("cpu"), ood=replaced)
    assert not data.clean_mask[replaced].any()
    assert np.array_equal(data.clean_mask[keep], labels[keep] == clean[keep])
    # a noise file that changes the label of a replaced image was made without this replacement: refused
    other = labels.copy()
    other[replaced[0]] = (clean[replaced[0]] + 1) % 10
    with open(os.path.join(data_path, "0.2_sym_ood0.25.json"), "w") as f:
        json.dump(other.tolist(), f)
    with pytest.raises(UserError, match="changes the label of image %d, which the open-set replacement" % replaced[0]):
        noise.make_noise(args, images, clean, 10, 300)


@pytest.mark.slow
def test_train_cifar_on_cifarn_labels_with_open_set_images(cifar_pair, tmp_path):
    data_path = str(tmp_path / "c10")
    clean = write_fake_cifar(data_path, "cifar10", n_train=64, n_test=20)
    content = write_cifarn(os.path.join(data_path, "CIFAR-10_human.pt"), clean)
    hwc = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "ood.npz", images=hwc)
    out = tmp_path / "run"
    args = ["--data_path", data_path, "--output_dir", out, "--noise_mode", "worst", "--ood_ratio", "0.25",
            "--ood_path", tmp_path / "ood.npz", "--warm_up", "1", "--batch_size", "8", "--eval_batch_size", "64",
            "--net_width", "8"]
    proc = run_script("Train_cifar.py", *args, "--num_epochs", 1)
    assert "lambda_u=0.0 (CIFAR-N preset of the noisypy reproduction)" in proc.stdout
    worst = content["worse_label"]
    assert f"worst labels {np.mean(worst != clean):.1%} noisy (the release's: 40.2%)" in proc.stdout
    prefix = "cifar10_worst_ood0.25"
    config = json.load(open(out / f"{prefix}_config.json"))
    assert config["ood_file"] == os.path.join(data_path, "worst_ood0.25_replaced.json")
    replaced = json.load(open(config["ood_file"]))["replaced"]
    assert len(replaced) == 16
    records = [json.loads(line) for line in open(out / f"{prefix}_log.jsonl")]
    assert [r["phase"] for r in records] == ["warmup", "train"]
    for net in ("net1", "net2"):
        assert 0 <= records[1][net]["ood_labeled"] <= min(16, records[1][net]["labeled"])
    # other replacement images than the checkpoint's: --resume refuses, naming both files
    replacement = json.load(open(config["ood_file"]))
    replacement["source_index"] = replacement["source_index"][1:] + replacement["source_index"][:1]
    with open(config["ood_file"], "w") as f:
        json.dump(replacement, f)
    proc = run_script("Train_cifar.py", *args, "--num_epochs", 2, "--resume", check=False)
    assert proc.returncode == 2
    assert (f"training labels from CIFAR-N file {data_path}/CIFAR-10_human.pt and replacement file "
            f"{config['ood_file']} differ") in proc.stderr
