"""CIFAR files, batched augmentation and the device-resident loaders."""

import numpy as np
import pytest
import torch

import cifar_files
import dataloader_cifar as dc
import device_batches
from fake_cifar import write_fake_cifar
from cli import UserError


def test_read_fake_cifar10(tmp_path):
    labels = write_fake_cifar(str(tmp_path), "cifar10", n_train=50, n_test=20)
    train_x, train_y, test_x, test_y = cifar_files.read_cifar(str(tmp_path), "cifar10")
    assert train_x.shape == (50, 3, 32, 32) and train_x.dtype == np.uint8
    assert train_y.tolist() == labels and test_x.shape == (20, 3, 32, 32) and len(test_y) == 20


def test_read_fake_cifar100_uses_fine_labels(tmp_path):
    labels = write_fake_cifar(str(tmp_path), "cifar100", n_train=200, n_test=100)
    _, train_y, _, _ = cifar_files.read_cifar(str(tmp_path), "cifar100")
    assert train_y.tolist() == labels and train_y.max() == 99


def test_channel_major_layout(tmp_path):
    write_fake_cifar(str(tmp_path), "cifar10", n_train=5, n_test=5)
    import pickle
    raw = pickle.load(open(tmp_path / "data_batch_1", "rb"), encoding="latin1")["data"][0]
    train_x, *_ = cifar_files.read_cifar(str(tmp_path), "cifar10")
    assert np.array_equal(train_x[0, 1].ravel(), raw[1024:2048])  # rows 1024..2047 are the green plane


def test_missing_files_message(tmp_path):
    with pytest.raises(UserError, match="lacks data_batch_1.*--download"):
        cifar_files.ensure_data(str(tmp_path), "cifar10", allow_download=False)


def test_missing_files_message_names_the_archive_the_files_and_the_folder_one_down(tmp_path):
    """One line: the archive the files come from and the files, or the nested folder the user meant."""
    with pytest.raises(UserError) as info:
        cifar_files.ensure_data(str(tmp_path), "cifar100", allow_download=False)
    message = str(info.value)
    assert message.startswith(f"{tmp_path} lacks train, test (the python version of cifar100, from "
                              "cifar-100-python.tar.gz): point --data_path at the folder holding train, test")
    assert message.endswith("or pass --download (docs/errors.md, Missing or bad data)") and "\n" not in message
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"")
    with pytest.raises(UserError, match="unpack cifar-100-python.tar.gz there .* pass --data_path "
                                        f"{tmp_path}/cifar-100-python"):
        cifar_files.ensure_data(str(tmp_path), "cifar100", allow_download=False)
    # pointed at the folder above the unpacked archive
    write_fake_cifar(str(tmp_path / "cifar-10-batches-py"), "cifar10", n_train=5, n_test=5)
    with pytest.raises(UserError) as info:
        cifar_files.ensure_data(str(tmp_path), "cifar10", allow_download=False)
    assert str(info.value) == (f"{tmp_path} lacks data_batch_1, data_batch_2, data_batch_3, data_batch_4, "
                               "data_batch_5, test_batch (the python version of cifar10, from cifar-10-python.tar.gz)"
                               f": its files are one folder down: pass --data_path {tmp_path}/cifar-10-batches-py "
                               "(docs/errors.md, Missing or bad data)")
    cifar_files.ensure_data(str(tmp_path / "cifar-10-batches-py"), "cifar10", allow_download=False)


def test_truncated_file_message(tmp_path):
    write_fake_cifar(str(tmp_path), "cifar10", n_train=50, n_test=10)
    path = tmp_path / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="data_batch_3 is truncated or corrupt"):
        cifar_files.read_cifar(str(tmp_path), "cifar10")


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match="could not download cifar10"):
        cifar_files.ensure_data(str(tmp_path), "cifar10", allow_download=True)


def test_crop_flip_shape_and_content():
    torch.manual_seed(0)
    imgs = torch.randint(1, 256, (500, 3, 32, 32), dtype=torch.uint8)  # no zero pixels in the source
    out = device_batches.random_crop_flip(imgs)
    assert out.shape == imgs.shape and out.dtype == torch.uint8
    for i in range(len(imgs)):
        # every output is a shifted (and maybe flipped) window of the zero-padded source
        padded = torch.nn.functional.pad(imgs[i], (4, 4, 4, 4))
        found = False
        for flip in (False, True):
            src = padded.flip(2) if flip else padded
            for oy in range(9):
                for ox in range(9):
                    if torch.equal(src[:, oy:oy + 32, ox:ox + 32], out[i]):
                        found = True
                        break
                if found:
                    break
            if found:
                break
        assert found
        if i >= 40:
            break


def test_crop_offsets_cover_padding_and_flip_is_half():
    torch.manual_seed(1)
    imgs = (torch.arange(32, dtype=torch.uint8) + 1).view(1, 1, 1, 32).repeat(4000, 1, 32, 1)  # columns 1..32
    out = device_batches.random_crop_flip(imgs)
    zero_rows = (out[:, 0, :, 16] == 0).sum(1)  # rows of zero padding at the top or bottom
    zero_cols = (out[:, 0, 16, :] == 0).sum(1)
    assert set(zero_rows.tolist()) == set(range(5))  # offsets 0..8 give 0..4 padded rows
    assert set(zero_cols.tolist()) == set(range(5))
    row = out[:, 0, 16, :].float()
    first = torch.where(row > 0, row, torch.full_like(row, 1e9)).argmin(1)  # column of the smallest value
    flipped = (first > 16).float().mean().item()  # the smallest column value sits on the right after a flip
    assert 0.45 < flipped < 0.55


def test_normalise_matches_to_tensor_then_normalize():
    imgs = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = dc.MEAN_STD["cifar10"]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    expected = (imgs.float() / 255 - m) / s
    assert torch.allclose(device_batches.normalise(imgs, m, s), expected)


def _data(n=30):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    clean = [i % 10 for i in range(n)]
    noisy = [(y + 1) % 10 if i % 3 == 0 else y for i, y in enumerate(clean)]
    return dc.CIFARData(imgs, noisy, clean, imgs[:12], clean[:12], "cifar10", torch.device("cpu"))


def test_loaders_sizes_order_and_partial_batches():
    data = _data(30)
    assert data.clean_mask.sum() == 20
    ev = list(data.eval_loader(8))
    assert [b[0].shape[0] for b in ev] == [8, 8, 8, 6]  # last partial batch kept, dataset order
    assert torch.equal(torch.cat([b[1] for b in ev]), data.noisy_labels)
    warm = data.warmup_loader(16)
    assert len(warm) == 2 and sorted(torch.cat([b[1] for b in warm]).tolist()) == sorted(data.noisy_labels.tolist())
    pred = np.arange(30) % 2 == 0
    prob = np.linspace(0, 1, 30)
    lab = data.labeled_loader(pred, prob, 4)
    batches = list(lab)
    assert lab.num_samples == 15 and len(batches) == 4
    ws = torch.cat([b[3] for b in batches])
    assert sorted(ws.tolist()) == pytest.approx(sorted(prob[pred].tolist()))
    x, x2 = batches[0][:2]
    assert x.shape == (4, 3, 32, 32) and not torch.equal(x, x2)  # two independent augmentations
    unl = data.unlabeled_loader(pred, 4)
    assert unl.num_samples == 15
    assert data.unlabeled_loader(np.ones(30, bool), 4) is None
    test = list(data.test_loader(5))
    assert sum(b[0].shape[0] for b in test) == 12
