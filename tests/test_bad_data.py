"""Bad data: CIFAR pickles with out-of-range labels or pixels, malformed list lines, missing or empty images,
stray files in the ImageNet folders, and images that cannot be decoded during a run (--max_bad_images)."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import cifar_files
from cli import UserError, run_main
from dataloader_clothing1M import Clothing1M
from dataloader_webvision import WebVision
from fake_cifar import write_fake_cifar
from fake_realworld import write_fake_clothing1m, write_fake_webvision
from imagelist import BadImages, ImageListDataset, check_images, make_loader
import Train_cifar
import Train_webvision
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")



def left_behind(folder):
    """What a refused start left in folder, its lock included (nothing: a refusal removes what the start made)."""
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def run(script, *args):
    """Run one of the training scripts; return the completed process."""
    return runs.run_script(script, *args, check=False)


def one_error_line(proc):
    """The single `error: ...` line of a run that stopped on bad input (exit code 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def run_in_process(module, capsys, *args):
    """Run a training script's main through run_main in this process (no start-up cost); its one error line."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main, module.get_args_parser().parse_args([str(a) for a in args]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


def listing(folder):
    """Every file under folder with its size and modification time."""
    found = {}
    for base, _, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(base, name))
            found[os.path.relpath(os.path.join(base, name), folder)] = (st.st_size, st.st_mtime_ns)
    return found


def corrupt(path):
    """Replace an image by random bytes under the same name."""
    with open(path, "wb") as f:
        f.write(np.random.default_rng(1).bytes(600))


def truncate(path):
    """Keep the first half of an image file."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


# ----------------------------------------------------------------------------- CIFAR

def rewrite_batch(path, label_key, change):
    """Load a fake CIFAR pickle, apply change(entry) and write it back."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    change(entry)
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _negative_train_label(entry):
    entry["labels"][3] = -1


def _test_label_10(entry):
    entry["labels"][0] = 10


def _pixels_300(entry):
    data = entry["data"].astype(np.int64)
    data[2, 5] = 300
    entry["data"] = data


@pytest.mark.parametrize("name,change,message", [
    ("data_batch_2", _negative_train_label, "data_batch_2 has labels outside 0..9 (e.g. -1)"),
    ("test_batch", _test_label_10, "test_batch has labels outside 0..9 (e.g. 10)"),
    ("data_batch_1", _pixels_300, "data_batch_1 has pixel values outside 0..255 (e.g. 300)"),
])
def test_cifar_bad_labels_and_pixels_stop_before_anything_is_written(tmp_path, capsys, name, change, message):
    data, out = tmp_path / "data", tmp_path / "out"
    write_fake_cifar(str(data), "cifar10", n_train=20, n_test=10)
    rewrite_batch(data / name, "labels", change)
    before = listing(data)
    args = ["--data_path", data, "--output_dir", out, "--num_epochs", 0]
    if name == "data_batch_2":  # once as the user runs it
        line = one_error_line(run("Train_cifar.py", *args))
    else:
        line = run_in_process(Train_cifar, capsys, *args)
    assert message in line and "replace it with the original file" in line
    assert listing(data) == before  # no noise file was written
    assert not left_behind(out)


def test_cifar_pixels_below_zero_and_labels_within_a_larger_num_class(tmp_path):
    write_fake_cifar(str(tmp_path), "cifar10", n_train=20, n_test=10)
    rewrite_batch(tmp_path / "data_batch_4", "labels", lambda e: e["labels"].__setitem__(0, 11))
    # --num_class 12 on a data set of one's own in this layout: labels up to 11 are fine, 12 is not
    assert cifar_files.read_cifar(str(tmp_path), "cifar10", 12)[1].max() == 11
    with pytest.raises(UserError, match="data_batch_4 has labels outside 0..9"):
        cifar_files.read_cifar(str(tmp_path), "cifar10")
    rewrite_batch(tmp_path / "data_batch_4", "labels", lambda e: e["labels"].__setitem__(0, 1))

    def set_pixel(value):
        """Store the pixels of data_batch_5 as int16 with pixel (0, 0) set to value."""
        def change(entry):
            entry["data"] = entry["data"].astype(np.int16)
            entry["data"][0, 0] = value
        return change

    rewrite_batch(tmp_path / "data_batch_5", "labels", set_pixel(-1))
    with pytest.raises(UserError, match=r"data_batch_5 has pixel values outside 0..255 \(e.g. -1\)"):
        cifar_files.read_cifar(str(tmp_path), "cifar10")
    # in-range values of a wider integer type are read as they are
    rewrite_batch(tmp_path / "data_batch_5", "labels", set_pixel(255))
    images = cifar_files.read_cifar(str(tmp_path), "cifar10")[0]
    assert images.dtype == np.uint8 and images[16, 0, 0, 0] == 255


# ----------------------------------------------------------------------------- lists and files at start

def test_list_lines_without_an_integer_label(tmp_path):
    write_fake_clothing1m(str(tmp_path), n_train=20, n_val=5, n_test=5)
    kv = tmp_path / "noisy_label_kv.txt"
    lines = kv.read_text().splitlines()
    for bad in ("images/0/train_3.jpg three", "images/0/train_3.jpg", "images/0/train_3.jpg 2.5",
                "images/0/train_3.jpg -1"):
        kv.write_text("\n".join(lines[:3] + [bad] + lines[4:]) + "\n")
        with pytest.raises(UserError) as err:
            Clothing1M(str(tmp_path), 14, 4, 2, 32, 0, CPU)
        assert f"noisy_label_kv.txt:4: {bad!r} is not `<path> <integer label>`" in str(err.value)
    kv.write_text("\n".join(lines[:3] + ["images/0/train_3.jpg 14"] + lines[4:]) + "\n")
    with pytest.raises(UserError, match=r"noisy_label_kv.txt:4: label 14 is outside 0..13"):
        Clothing1M(str(tmp_path), 14, 4, 2, 32, 0, CPU)
    kv.write_bytes(b"\xff\xfe binary\n")
    with pytest.raises(UserError, match="noisy_label_kv.txt is not a UTF-8 text file"):
        Clothing1M(str(tmp_path), 14, 4, 2, 32, 0, CPU)


@pytest.mark.slow
def test_malformed_list_lines_are_one_line_before_any_output(tmp_path, capsys):
    clothing, web, out = tmp_path / "clothing", tmp_path / "web", tmp_path / "out"
    write_fake_clothing1m(str(clothing), n_train=20, n_val=5, n_test=5)
    with open(clothing / "clean_label_kv.txt", "a") as f:
        f.write("\nimages/1/val_7.jpg x7\n")
    line = one_error_line(run("Train_clothing1M.py", "--data_path", clothing, "--output_dir", out, "--pretrained",
                              "none"))
    assert "clean_label_kv.txt:12: 'images/1/val_7.jpg x7' is not `<path> <integer label>`" in line
    assert not left_behind(out)

    write_fake_webvision(str(web), n_train=8, n_val=4, n_imagenet=4)
    with open(web / "info" / "train_filelist_google.txt", "a") as f:
        f.write("google/q0001/000001.jpg\n")
    line = run_in_process(Train_webvision, capsys, "--data_path", web, "--output_dir", out)
    assert "train_filelist_google.txt:10: 'google/q0001/000001.jpg' is not `<path> <integer label>`" in line
    assert not left_behind(out)


def test_every_listed_image_is_checked_at_start(tmp_path):
    write_fake_clothing1m(str(tmp_path), n_train=200, n_val=5, n_test=5)
    # the old check looked at 64 random images (seed 0); remove one it would not have looked at
    sampled = set(np.random.default_rng(0).choice(200, size=64, replace=False).tolist())
    unsampled = min(set(range(200)) - sampled)
    gone = tmp_path / str(unsampled % 3) / f"train_{unsampled}.jpg"
    os.remove(gone)
    with pytest.raises(UserError) as err:
        Clothing1M(str(tmp_path), 14, 4, 2, 32, 0, CPU)
    assert f"1 of 200 images listed in {tmp_path / 'noisy_train_key_list.txt'} are missing ({gone})" in str(err.value)
    assert "check --data_path" in str(err.value)
    gone.write_bytes(b"")
    (tmp_path / "1" / "train_199.jpg").unlink()
    with pytest.raises(UserError, match=r"2 of 200 images listed in .* are empty or missing \(.*train_%d.jpg "
                                        r"\(empty\), .*train_199.jpg \(missing\)\)" % unsampled):
        Clothing1M(str(tmp_path), 14, 4, 2, 32, 0, CPU)


def test_stat_check_of_many_files_is_quick(tmp_path):
    import time
    target = tmp_path / "one.jpg"
    target.write_bytes(b"x")
    paths = [str(target)] * 200_000
    t0 = time.perf_counter()
    check_images(paths, "list")
    assert time.perf_counter() - t0 < 20  # a million would take seconds, not minutes


def test_stray_files_in_imagenet_folders_are_skipped_with_a_warning(tmp_path, capsys):
    write_fake_webvision(str(tmp_path), n_train=8, n_val=4, n_imagenet=4)
    folder = tmp_path / "imagenet" / "val" / "0"
    (folder / "README.txt").write_text("how these images were chosen\n")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    (folder / "subfolder").mkdir()
    data = WebVision(str(tmp_path), 50, 4, 75, "center", 0, CPU)
    assert len(data.imagenet_paths) == 4 and all(p.endswith(".JPEG") for p in data.imagenet_paths)
    out = capsys.readouterr().out
    assert "warning: skipped 2 entries of" in out and "0/README.txt, 0/subfolder" in out and ".DS_Store" not in out


def test_webvision_negative_label_is_an_error_and_labels_beyond_num_class_are_dropped(tmp_path):
    write_fake_webvision(str(tmp_path), n_train=8, n_val=4, n_imagenet=4)
    with open(tmp_path / "info" / "val_filelist.txt", "a") as f:
        f.write("val00000001.jpg -3\n")
    with pytest.raises(UserError, match=r"val_filelist.txt:6: 'val00000001.jpg -3' is not"):
        WebVision(str(tmp_path), 50, 4, 75, "center", 0, CPU)


# ----------------------------------------------------------------------------- unreadable images in a run

def _images(folder, n):
    """n small JPEGs of distinct colours; their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i}.jpg")
        Image.fromarray(np.full((12, 12, 3), 20 * i, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_an_unreadable_image_is_replaced_by_the_next_readable_one(tmp_path):
    paths = _images(str(tmp_path), 5)
    corrupt(paths[1])
    truncate(paths[4])
    tf = T.Compose([T.Resize(8), T.ToTensor()])
    ds = ImageListDataset(paths, [0, 1, 2, 3, 4], tf, max_tries=3)
    good = ds[2]
    assert good[2] == ""
    sub = ds[1]
    assert torch.equal(sub[0], good[0]) and sub[1] == 2  # image and label of entry 2
    report = json.loads(sub[2])
    assert report["blank"] is False and report["bad"][0][0] == paths[1]
    assert "not an image format" in report["bad"][0][1]
    last = ds[4]  # the last entry wraps around to the first
    assert torch.equal(last[0], ds[0][0]) and "truncated" in json.loads(last[2])["bad"][0][1].lower()
    corrupt(paths[2])
    corrupt(paths[3])
    # three unreadable in a row with max_tries 3: a blank stand-in, and the run stops on its report
    blank = ds[1]
    assert json.loads(blank[2])["blank"] is True
    with pytest.raises(UserError, match="none of 3 consecutive listed images"):
        BadImages(10).record([blank[2]])


def test_reports_reach_the_main_process_from_worker_processes(tmp_path, capsys):
    paths = _images(str(tmp_path), 10)
    corrupt(paths[3])
    truncate(paths[7])
    tf = T.Compose([T.Resize(8), T.ToTensor()])
    bad = BadImages(5)
    ds = ImageListDataset(paths, list(range(10)), tf, max_tries=bad.max_tries)
    loader = make_loader(ds, 4, False, 2, CPU, bad)
    labels = torch.cat([labels for _, labels in loader])
    assert labels.tolist() == [0, 1, 2, 4, 4, 5, 6, 8, 8, 9]  # one row per entry, in order: loss alignment
    assert bad.count == 2 and list(bad.found) == [paths[3], paths[7]]
    assert capsys.readouterr().out.count("warning: skipped unreadable image") == 2
    evaluation = make_loader(ds, 4, False, 2, CPU, bad, drop_bad=True)
    assert torch.cat([labels for _, labels in evaluation]).tolist() == [0, 1, 2, 4, 5, 6, 8, 9]
    assert bad.epoch_record() == {"bad_images": 2, "new_bad_images": [paths[3], paths[7]]}
    assert bad.epoch_record() == {"bad_images": 2, "new_bad_images": []}
    strict = BadImages(1)
    with pytest.raises(UserError, match=r"2 images could not be read, more than --max_bad_images 1: .*3.jpg"):
        list(make_loader(ds, 4, False, 2, CPU, strict))
    # resume: an image replaced since is forgiven, one still broken keeps counting
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(paths[3])
    resumed = BadImages(5)
    resumed.restore(bad.state())
    assert list(resumed.found) == [paths[7]] and resumed.epoch_record()["new_bad_images"] == []
    with pytest.raises(UserError, match="--max_bad_images -1 is negative"):
        BadImages(-1)


class OriginalDataset(Dataset):
    """The dataset as it was before bad images were handled: the reference for identical samples."""

    def __init__(self, paths, labels, transform, mode, prob=None):
        """Same arguments as ImageListDataset."""
        self.paths, self.labels, self.transform, self.mode, self.prob = paths, np.asarray(labels), transform, mode, prob

    def __len__(self):
        """Number of images."""
        return len(self.paths)

    def __getitem__(self, i):
        """The original loading and transforms."""
        with open(self.paths[i], "rb") as f:
            image = Image.open(f).convert("RGB")
        if self.mode == "labeled":
            return self.transform(image), self.transform(image), int(self.labels[i]), float(self.prob[i])
        if self.mode == "unlabeled":
            return self.transform(image), self.transform(image)
        return self.transform(image), int(self.labels[i])


@pytest.mark.parametrize("workers", [0, 2])
def test_without_bad_images_the_batches_are_those_of_the_original_code(tmp_path, workers):
    paths = _images(str(tmp_path), 9)
    tf = T.Compose([T.RandomResizedCrop(8), T.RandomHorizontalFlip(), T.ToTensor()])
    prob = np.linspace(0, 1, 9, dtype=np.float32)

    def loaders(mode, original):
        """A shuffled loader of the 9 images, through the original code's path or this one's."""
        if original:
            return DataLoader(OriginalDataset(paths, range(9), tf, mode, prob), batch_size=4, shuffle=True,
                              num_workers=workers)
        return make_loader(ImageListDataset(paths, range(9), tf, mode, prob, max_tries=101), 4, True, workers, CPU,
                           BadImages(100))

    def engine_pass(original):
        """Batches as train_epoch draws them: the unlabeled iterator is made first, then labeled batches pull it."""
        torch.manual_seed(3)
        unlabeled_iter = iter(loaders("unlabeled", original))
        warm = list(loaders("plain", original))
        return warm + [(*x, *next(unlabeled_iter)) for x in loaders("labeled", original)]

    ref, new = engine_pass(True), engine_pass(False)
    assert len(ref) == len(new) == 6
    for a, b in zip(ref, new):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _clothing_with_bad_images(root):
    """Fake Clothing1M whose 14 training images all enter every warm-up draw; 3 of its images cannot be decoded."""
    write_fake_clothing1m(str(root), n_train=14, n_val=6, n_test=6)
    bad = [root / "0" / "train_3.jpg", root / "2" / "train_5.jpg", root / "2" / "val_2.jpg"]
    corrupt(bad[0])
    truncate(bad[1])
    corrupt(bad[2])
    return [str(p) for p in bad]


CLOTHING_FAST = ["--pretrained", "none", "--batch_size", 4, "--num_batches", 3, "--image_size", 48, "--num_epochs", 0]


@runs.LARGE_ON_DISK
@pytest.mark.slow
def test_a_run_with_fewer_bad_images_than_allowed_completes_and_logs_them(tmp_path):
    data, out = tmp_path / "clothing", tmp_path / "out"
    bad = _clothing_with_bad_images(data)
    proc = run("Train_clothing1M.py", "--data_path", data, "--output_dir", out, *CLOTHING_FAST, "--num_workers", 2,
               "--max_bad_images", 3)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(x) for x in (out / "clothing1m_log.jsonl").read_text().splitlines()]
    assert records[0]["bad_images"] == 3 and sorted(records[0]["new_bad_images"]) == sorted(bad)
    assert records[1]["phase"] == "test" and records[1]["bad_images"] == 3 and records[1]["new_bad_images"] == []
    assert sum("warning: skipped unreadable image" in line for line in proc.stdout.splitlines()) == 3
    assert "bad images 3" in proc.stdout
    ckpt = torch.load(out / "clothing1m_checkpoint.pth.tar", weights_only=False)
    assert sorted(p for p, _ in ckpt["bad_images"]) == sorted(bad)


@pytest.mark.slow
def test_more_bad_images_than_allowed_stop_the_run_with_one_line(tmp_path):
    data, out = tmp_path / "clothing", tmp_path / "out"
    bad = _clothing_with_bad_images(data)
    before = listing(data)
    line = one_error_line(run("Train_clothing1M.py", "--data_path", data, "--output_dir", out, *CLOTHING_FAST,
                              "--num_workers", 0, "--max_bad_images", 2))
    assert line.startswith("error: 3 images could not be read, more than --max_bad_images 2: ")
    assert all(p in line for p in bad) and "--resume" in line
    assert listing(data) == before
    assert not os.path.exists(out / "clothing1m_checkpoint.pth.tar")
