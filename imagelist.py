"""Image-list data shared by the real-world benchmarks (Clothing1M, WebVision): the list parser, the start-up check
of every referenced file, a Dataset over file paths with the DivideMix sample modes, the loader that reports
unreadable images to the main process, the class-balanced draw, and the record of a run's unreadable images.

Bad-image policy: an image that cannot be decoded during a run is replaced by the next readable image of its list
(that image's pixels, label and clean probability), so every loader keeps its length and sample order and the loss
evaluation still gives one loss per list entry; evaluation loaders (val, test) drop such rows instead, so
accuracies count readable images only. Each distinct unreadable file is reported once on the console and counted
for the whole run; one more than --max_bad_images stops the run with one line.
"""
import json
import os
import stat
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import AuthenticationError

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from cli import UserError
from distributed import gather_objects, world_size

# What one sample is in each loader mode of the algorithm engine (dividemix.py).
MODES = ("plain", "labeled", "unlabeled")
LINE_FORMAT = "<path> <integer label>"
# Extensions read from image folders (case-insensitive); other files there are skipped with a warning.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
STAT_THREADS = 32
STAT_CHUNK = 4096
SHOWN = 3  # paths quoted in a message


# ----------------------------------------------------------------------------- list files

def _shorten(text, width=80):
    """text cut to `width` characters, marked when cut."""
    return text if len(text) <= width else text[:width - 3] + "..."


def _examples(items):
    """The first few items joined for a message, with how many more there are."""
    more = len(items) - SHOWN
    return ", ".join(items[:SHOWN]) + (f" and {more} more" if more > 0 else "")


def numbered_lines(path):
    """(line number, stripped text) of every non-empty line of a UTF-8 text file."""
    try:
        with open(path, encoding="utf-8") as f:
            return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not a UTF-8 text file ({exc.reason} at byte {exc.start}): point --data_path at "
                        "the dataset's own list files") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc}): check --data_path and the file's "
                        "permissions") from None


def read_labeled_list(path):
    """(line number, path, label) of every line of a `<path> <integer label>` file; UserError on the first bad line."""
    rows = []
    for number, text in numbered_lines(path):
        # the label is the last field, so a path may hold spaces
        fields = text.rsplit(None, 1)
        try:
            label = int(fields[1]) if len(fields) == 2 else None
        except ValueError:
            label = None
        if label is None or label < 0:
            raise UserError(f"{path}:{number}: {_shorten(text)!r} is not `{LINE_FORMAT}` with a label of 0 or more: "
                            "fix or delete the line")
        rows.append((number, fields[0], label))
    return rows


def check_list_files(root, names, what):
    """UserError naming the list files of `what` absent under root."""
    missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise UserError(f"{what}: {root} lacks {', '.join(missing)}: point --data_path at the dataset root "
                        "(see docs/real_world.md, Data)")


# ----------------------------------------------------------------------------- files on disk

def _stat_problems(paths):
    """(path, problem) for each of paths that is missing, not a regular file, or empty."""
    problems = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            problems.append((path, "missing"))
            continue
        except OSError as exc:
            problems.append((path, exc.strerror or type(exc).__name__))
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append((path, "not a file"))
        elif st.st_size == 0:
            problems.append((path, "empty"))
    return problems


def check_images(paths, source):
    """UserError when any referenced image is missing, not a file or empty (one stat each, in parallel threads)."""
    # No decoding here: a million decodes would take as long as an epoch; images that fail to decode are handled
    # while the run reads them (the module's bad-image policy).
    if not len(paths):
        raise UserError(f"{source} lists no images: check the file and --num_class")
    chunks = [paths[i:i + STAT_CHUNK] for i in range(0, len(paths), STAT_CHUNK)]
    # threads, because a stat waits on the file system (network file systems above all), not on Python
    with ThreadPoolExecutor(max_workers=min(STAT_THREADS, len(chunks))) as pool:
        problems = [p for found in pool.map(_stat_problems, chunks) for p in found]
    if problems:
        kinds = list(dict.fromkeys(why for _, why in problems))
        shown = [p if len(kinds) == 1 else f"{p} ({why})" for p, why in problems]
        raise UserError(f"{len(problems)} of {len(paths)} images listed in {source} are {' or '.join(kinds)} "
                        f"({_examples(shown)}): check --data_path and that the images were extracted completely, "
                        "or delete their lines")


def list_image_folder(folder):
    """Sorted paths of the image files in folder, and the sorted names of its other entries (hidden ones ignored)."""
    images, others = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            is_image = entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
            (images if is_image else others).append(entry.name)
    return [os.path.join(folder, name) for name in sorted(images)], sorted(others)


def decode_image(path):
    """The image at path as RGB; convert() decodes every pixel, so corrupt and truncated files raise here."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def describe_error(exc):
    """One short line for an exception raised while decoding an image."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, UnidentifiedImageError):
        text = "not an image format Pillow can read"  # its own text repeats the file object
    return _shorten(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, 120)


# ----------------------------------------------------------------------------- dataset and loader

class ImageListDataset(Dataset):
    """Images given by path. plain: (image, label); labeled: (view, view, label, w); unlabeled: (view, view).

    Every sample ends with one more item, a report for the loader (see ImageLoader): "" when image i was read,
    else JSON {"bad": [[path, error], ...], "blank": bool} of the unreadable images met, the sample then being the
    next readable image of the list (up to max_tries images are tried; "blank" when none was readable).
    """

    def __init__(self, paths, labels, transform, mode="plain", prob=None, max_tries=1):
        """paths: list of file paths; labels: int array; prob: clean probability per sample (labeled mode)."""
        assert mode in MODES
        self.paths, self.labels, self.transform, self.mode = list(paths), np.asarray(labels), transform, mode
        self.prob = None if prob is None else np.asarray(prob, dtype=np.float32)
        self.max_tries = max(1, min(max_tries, len(self.paths)))

    def __len__(self):
        """Number of images."""
        return len(self.paths)

    def _sample(self, i, image):
        """The sample of list entry i built from a decoded image (two transforms in labeled and unlabeled mode)."""
        if self.mode == "labeled":
            return self.transform(image), self.transform(image), int(self.labels[i]), float(self.prob[i])
        if self.mode == "unlabeled":
            return self.transform(image), self.transform(image)
        return self.transform(image), int(self.labels[i])

    def __getitem__(self, i):
        """Sample i followed by its report; an unreadable image i is replaced by the next readable one."""
        bad = []
        for step in range(self.max_tries):
            j = (i + step) % len(self.paths)
            try:
                image = decode_image(self.paths[j])
            except Exception as exc:  # any failure to read or decode the file makes it a bad image
                bad.append([self.paths[j], describe_error(exc)])
                continue
            return (*self._sample(j, image), json.dumps({"bad": bad, "blank": False}) if bad else "")
        # Nothing readable within max_tries: the main process stops the run on this report; the blank image only
        # gives the batch its shape until then.
        return (*self._sample(i, Image.new("RGB", (8, 8))), json.dumps({"bad": bad, "blank": True}))


class ImageLoader:
    """A DataLoader over an ImageListDataset yielding the engine's tuples (the reports taken off).

    The reports travel inside the batches, so they reach the main process whatever the number of worker processes,
    and are handed to `bad_images` there. With drop_bad (evaluation), rows standing in for an unreadable image are
    removed from the batch instead of being kept as substitutes.
    """

    def __init__(self, loader, bad_images, drop_bad=False):
        """loader: a DataLoader whose samples end with a report; bad_images: the run's BadImages."""
        self.loader, self.bad_images, self.drop_bad = loader, bad_images, drop_bad
        self.dataset, self.batch_size = loader.dataset, loader.batch_size

    def __len__(self):
        """Number of batches."""
        return len(self.loader)

    def __iter__(self):
        """Batches of one pass, as the DataLoader gives them minus the reports."""
        # iter() of the DataLoader now, not at the first batch: it draws the shuffle's and the workers' seeds, and
        # the engine creates the unlabeled iterator before the labeled one, so the draws must stay in that order
        return self._batches(iter(self.loader))

    def _batches(self, batches):
        """The batches of a DataLoader iterator, reports handed to bad_images and taken off."""
        for *batch, reports in batches:
            if any(reports):
                self.bad_images.record(reports)
                if self.drop_bad:
                    keep = torch.tensor([not r for r in reports])
                    batch = [t[keep] for t in batch]
            yield batch


def make_loader(dataset, batch_size, shuffle, num_workers, device, bad_images, persistent=False, drop_bad=False,
                sampler=None):
    """ImageLoader with worker processes and pinned memory on CUDA; `persistent` for loaders reused every epoch;
    `sampler` (instead of shuffle) for a rank's share of a shuffle."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=persistent and num_workers > 0,
                        worker_init_fn=quiet_worker_threads)
    return ImageLoader(loader, bad_images, drop_bad)


class ListLoaders:
    """Loaders over image lists for one run: its worker processes, its device, its record of unreadable images and,
    with several processes, its Shard: a shuffled loader then yields this rank's share of a shuffle common to all
    ranks in batches of batch_size / world, a loader in order this rank's contiguous span of the list."""

    def __init__(self, num_workers, device, max_bad_images, shard=None):
        """The run's loader settings; bad_images counts the unreadable images its loaders meet."""
        self.num_workers, self.device, self.shard = num_workers, device, shard
        self.bad_images = BadImages(max_bad_images)

    def __call__(self, paths, labels, transform, mode, prob, batch_size, shuffle, persistent=False, drop_bad=False):
        """Loader over an ImageListDataset whose unreadable images are reported to the run's BadImages.

        batch_size: the global batch of a shuffled (training) loader, the per-process batch of one in order."""
        sampler = None
        # an empty division gives a loader of no batches: torch refuses to shuffle an empty set
        shuffle = shuffle and len(paths) > 0
        if self.shard is not None and shuffle:
            sampler, shuffle = self.shard.sampler(len(paths)), False
            batch_size //= self.shard.world
        elif self.shard is not None:
            start, stop = self.shard.span(len(paths))
            paths, labels = paths[start:stop], labels[start:stop]
            prob = None if prob is None else prob[start:stop]
        dataset = ImageListDataset(paths, labels, transform, mode, prob, self.bad_images.max_tries)
        return make_loader(dataset, batch_size, shuffle, self.num_workers, self.device, self.bad_images, persistent,
                           drop_bad, sampler)


def quiet_worker_threads(worker_id):
    """In a loader worker: no traceback when the main process stops while it fetches a batch.

    A worker hands each batch's shared memory to the main process over a connection served by a thread of its own
    (multiprocessing's resource sharer); when a signal stops the main process in the middle of that hand-over, the
    connection breaks, which is no error of the run (the main process reports the stop in one line). The sharer
    thread reports its errors through sys.excepthook, other threads through threading.excepthook: both pass on
    every exception but a broken connection to the main process.
    """
    quiet = (ConnectionError, EOFError, AuthenticationError)
    default_thread_hook, default_hook = threading.excepthook, sys.excepthook

    def thread_hook(args):
        """threading.excepthook without broken connections."""
        if not issubclass(args.exc_type, quiet):
            default_thread_hook(args)

    def hook(exc_type, exc, tb):
        """sys.excepthook without broken connections."""
        if not issubclass(exc_type, quiet):
            default_hook(exc_type, exc, tb)

    threading.excepthook, sys.excepthook = thread_hook, hook


def add_loader_arguments(parser):
    """The image-list scripts' loader flags: worker processes and how many unreadable images a run may skip."""
    parser.add_argument("--num_workers", default=default_num_workers(), type=int,
                        help="image-loading processes (default: the CPU count, shared out among the processes torchrun "
                             "starts on the machine, at most 8)")
    parser.add_argument("--max_bad_images", default=100, type=int,
                        help="unreadable images skipped (with a warning) in a run before it stops; 0: stop at the "
                             "first")


def default_num_workers():
    """Worker processes per loader: the CPU count (shared by the processes torchrun starts on this machine), at
    most 8."""
    per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, per_process))


class BadImages:
    """The unreadable images a run has met (path -> error, in the order met) and the --max_bad_images limit."""

    def __init__(self, max_bad):
        """max_bad: distinct unreadable images tolerated in a run (0: none)."""
        if max_bad < 0:
            raise UserError(f"--max_bad_images {max_bad} is negative: give 0 (stop at the first unreadable image) or "
                            "more")
        self.max_bad = max_bad
        self.found = {}
        self.logged = 0  # how many of `found` earlier epoch records already listed

    @property
    def count(self):
        """Distinct unreadable images met in the run so far."""
        return len(self.found)

    @property
    def max_tries(self):
        """Images a sample may try before giving up: past this many failures the run stops anyway."""
        return self.max_bad + 1

    def record(self, reports):
        """Take a batch's reports: warn once per new unreadable image; UserError past the limit."""
        blank = None
        for report in filter(None, reports):
            info = json.loads(report)
            for path, error in info["bad"]:
                if path not in self.found:
                    self.found[path] = error
                    print(f"warning: skipped unreadable image {path} ({error}); {len(self.found)} in this run, "
                          f"--max_bad_images {self.max_bad}", flush=True)
            if info["blank"]:
                blank = info["bad"]
        self._check_limit()
        if blank is not None:
            raise UserError(f"none of {len(blank)} consecutive listed images from {blank[0][0]} could be read: "
                            "check the image files (re-extract the archive)")

    def share(self):
        """With several processes: every rank learns the unreadable images the other ranks met (the logs and the
        checkpoint list the run's images, and --max_bad_images counts them over all ranks)."""
        if world_size() == 1:
            return
        for rank, state in enumerate(gather_objects(self.state())):
            for path, error in state:
                if path not in self.found:
                    self.found[path] = error
                    print(f"warning: rank {rank} skipped unreadable image {path} ({error}); {len(self.found)} in "
                          f"this run, --max_bad_images {self.max_bad}", flush=True)
        self._check_limit()

    def _check_limit(self):
        """UserError when the run has met more unreadable images than --max_bad_images."""
        if len(self.found) > self.max_bad:
            listed = [f"{p} ({e})" for p, e in self.found.items()]
            raise UserError(f"{len(self.found)} images could not be read, more than --max_bad_images {self.max_bad}: "
                            f"{_examples(listed)}: replace them with readable copies (re-extract the archive) and "
                            "continue with --resume, or raise --max_bad_images")

    def epoch_record(self):
        """The JSON log's fields: bad_images (run total so far), new_bad_images (paths first met since last call)."""
        paths = list(self.found)
        new, self.logged = paths[self.logged:], len(paths)
        return {"bad_images": len(paths), "new_bad_images": new}

    def state(self):
        """[[path, error], ...] for the checkpoint."""
        return [[p, e] for p, e in self.found.items()]

    def restore(self, state):
        """Resume: keep the checkpoint's unreadable images that still cannot be read (replaced files are forgiven)."""
        for path, error in state:
            try:
                decode_image(path)
            except Exception:  # still bad, whatever the reason
                self.found[path] = error
        self.logged = len(self.found)
        if len(state):
            print(f"resume: {len(self.found)} of the {len(state)} unreadable images recorded are still unreadable",
                  flush=True)


# ----------------------------------------------------------------------------- draws

def class_balanced_draw(labels, num_samples, num_class, rng):
    """Indices of a shuffled subset with at most ceil(num_samples / num_class) per class and num_samples in all.

    Same rule as the original loop (shuffle, then keep an image while its class has fewer than num_samples /
    num_class and the total is below num_samples, then shuffle the kept ones), without a loop over images.
    """
    labels = np.asarray(labels)
    order = rng.permutation(len(labels))
    shuffled = labels[order]
    # rank of each image within its class, in shuffled order
    sort = np.argsort(shuffled, kind="stable")
    counts = np.bincount(shuffled, minlength=num_class)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(labels), dtype=np.int64)
    rank[sort] = np.arange(len(labels)) - np.repeat(starts, counts)
    keep = order[rank < np.ceil(num_samples / num_class)][:num_samples]
    return keep[rng.permutation(len(keep))]
