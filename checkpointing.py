"""Atomic files, checkpoints (written in the background, verified, checked on resume) and random states."""
import errno
import hashlib
import json
import os
import random
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from cli import UserError, see_doc
from distributed import gather_objects, get_rank, seed_everything, world_size

# errno values of a write that failed for want of space or permission on the output's file system.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EIO})


def get_rng_state():
    """Capture every global random state the training loop draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore the states captured by get_rng_state."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temp_name(path):
    """A unique hidden temporary name beside path: .<name>.<random>.tmp (the run folder removes stale ones)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")


def fsync_folder(folder):
    """Make a rename in folder durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write, keep_previous=None):
    """write(f) into a temporary file beside path, fsync, rename over path: a crash never leaves half a file.

    keep_previous: a path that receives the file being replaced (a hard link, else a copy), itself atomically.
    The temporary file is created with mode 0666 less the umask, like any file the run writes.
    """
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.exists(path):
            link_or_copy(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, path) from exc
        raise
    fsync_folder(os.path.dirname(os.path.abspath(path)))


class _WriteRecorder:
    """A binary file wrapper that remembers the OSError of a failed write."""

    def __init__(self, f):
        """f: an open binary file."""
        self.f, self.error = f, None

    def write(self, data):
        """Write through; keep the error of a failed write before raising it."""
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self):
        """Flush the file."""
        self.f.flush()


def link_or_copy(src, dst):
    """Atomically make dst a hard link to src (a copy on file systems without hard links)."""
    tmp = temp_name(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS - {errno.EPERM}:
                raise
            with open(src, "rb") as s, open(tmp, "wb") as d:
                while chunk := s.read(1 << 24):
                    d.write(chunk)
                d.flush()
                os.fsync(d.fileno())
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path, keep_previous=None):
    """torch.save through atomic_write."""
    atomic_write(path, lambda f: _torch_save(obj, f), keep_previous)


def _torch_save(obj, f):
    """torch.save into an open file; a failed write raises its OSError, not torch's own words for it."""
    recorder = _WriteRecorder(f)
    try:
        torch.save(obj, recorder)
    except Exception as exc:
        if recorder.error is not None and not isinstance(exc, OSError):
            raise recorder.error from exc
        raise


def atomic_json(obj, path):
    """json.dump through atomic_write."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def verify_checkpoint(path):
    """None when the file is intact, else what is wrong with it.

    torch.save writes a zip archive that stores a CRC-32 of every record (the pickle and each tensor's bytes);
    reading them all back checks the whole payload.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:  # a damaged archive fails in many ways; each means the same to the user
        return f"not a readable checkpoint archive: {type(exc).__name__}: {exc}"
    return None if bad is None else f"record {bad} fails its CRC-32 check"


def load_checkpoint(path, mmap=False):
    """Load a checkpoint written by this project onto the CPU (mmap: tensors read lazily, for a quick look)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path} ({type(exc).__name__}): point --resume at a checkpoint "
                        f"file written by this project{see_doc('Resume')}") from exc


def _cpu_copy(obj):
    """A deep copy of obj with every tensor copied to the CPU, safe to save while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints atomically in a background thread, one at a time, so the next epoch need not wait.

    on_error is called from the writer thread when a write fails, so the main thread can stop at once instead
    of an epoch later.
    """

    def __init__(self, on_error=None):
        """Start the writer thread pool."""
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = None
        self.on_error = on_error

    def save(self, obj, path, keep_previous=None, on_done=None):
        """Snapshot obj now (tensors copied to the CPU) and write it to path in the background."""
        self.wait()
        self.pending = self.pool.submit(self._write, _cpu_copy(obj), path, keep_previous, on_done)

    def _write(self, obj, path, keep_previous, on_done):
        """The background job: the atomic write, then on_done(), or on_error() when it fails."""
        try:
            atomic_save(obj, path, keep_previous)
        except BaseException:
            if self.on_error is not None:
                self.on_error()
            raise
        if on_done is not None:
            on_done()

    def wait(self):
        """Block until the last write is on disk; re-raise its error, if any."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self):
        """Finish the last write and stop the thread."""
        try:
            self.wait()
        finally:
            self.pool.shutdown()


def check_resume_args(saved, current, keys):
    """Raise a UserError naming the first defining argument that differs from the checkpoint's."""
    for key in keys:
        if key in saved and saved[key] != current.get(key):
            raise UserError(f"--resume checkpoint was made with --{key} {saved[key]!r}, this run has "
                            f"{current.get(key)!r}: pass the same value or start a new --output_dir{see_doc('Resume')}")


def labels_digest(labels):
    """SHA-256 of the training labels as int64: what makes two runs train on the same noisy labels."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).tobytes()).hexdigest()


def run_state(epoch, defining, args, nets, optimizers, **extra):
    """Everything a checkpoint after `epoch` holds to continue exactly; `extra` adds the script's own state."""
    state = {"epoch": epoch, "args": defining, "all_args": vars(args), "nets": [n.state_dict() for n in nets],
             "optimizers": [o.state_dict() for o in optimizers], "rng": get_rng_state(), **extra}
    if world_size() > 1:  # a collective: every rank calls run_state, rank 0 writes
        state["rng_ranks"] = gather_objects(state["rng"])
    return state


def restore_rng(checkpoint, seed):
    """Continue each process's random draws: exactly when the checkpoint was written by as many processes (or by
    one, resumed by one); otherwise reseed from --seed, the rank and the epoch (the run goes on, not bit for bit)."""
    states = checkpoint.get("rng_ranks") or [checkpoint["rng"]]
    if len(states) == world_size():
        set_rng_state(states[get_rank()])
        return True
    seed_everything(int(np.random.SeedSequence([seed, get_rank(), checkpoint["epoch"]]).generate_state(1)[0]))
    print(f"resume: the checkpoint was written by {len(states)} process(es), this run has {world_size()}: weights, "
          "optimizers and divisions continue, the random draws start afresh", flush=True)
    return False
