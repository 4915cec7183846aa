"""Infrastructure shared by the training scripts: errors and signals, seeding, RNG state, atomic
files, checkpoints, the run folder (lock, logs, checkpoint, resume), progress."""
import _thread
import errno
import fcntl
import hashlib
import inspect
import json
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

# The errors live in the torch-free cli.py (with run_main).
from cli import STOP_SIGNALS, Interrupted, ReportedOnRankZero, UserError
from rundirs import restartable

DDP_PARAMETERS = inspect.signature(DistributedDataParallel).parameters
# errno values of a write that failed for want of space or permission on the output's file system.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EIO}


def seed_everything(seed):
    """Seed Python's, numpy's and torch's global generators from one integer."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def select_device(gpuid):
    """CUDA device `gpuid` when CUDA is available, otherwise the CPU."""
    if torch.cuda.is_available():
        if not 0 <= gpuid < torch.cuda.device_count():
            raise UserError(f"--gpuid {gpuid} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(gpuid)
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", gpuid)
    return torch.device("cpu")


# ----------------------------------------------------------------------------- several processes (torchrun)

def init_distributed(gpuid=None):
    """The training device. Under torchrun: cuda:LOCAL_RANK (--gpuid ignored), and with several processes the
    process group (NCCL on CUDA, gloo on the CPU); ranks other than 0 print nothing to stdout."""
    if "WORLD_SIZE" not in os.environ:
        return select_device(gpuid or 0)
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} has no CUDA device ({torch.cuda.device_count()} visible): give "
                            "torchrun at most that many --nproc_per_node")
        device = select_device(local)
    else:
        device = torch.device("cpu")
    ignored = f" (--gpuid {gpuid} is ignored under torchrun)" if gpuid is not None else ""
    print(f"torchrun: rank {rank} of {world} on {device}{ignored}", flush=True)
    if world > 1:
        try:
            if device.type == "cuda":
                dist.init_process_group("nccl", device_id=device)
            else:
                dist.init_process_group("gloo")
        except Exception as exc:
            if not (restart_count() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
                raise
            # torch's rendezvous store, shared with the workers by default, still holds the addresses of the
            # attempt before; restarted workers may read those and fail to connect
            raise UserError(f"the processes of torchrun restart {restart_count()} could not connect ({exc}): export "
                            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun --max_restarts, then run it again "
                            "(it continues from the last checkpoint)") from None
        if rank != 0:  # one console: the logs and progress lines are rank 0's
            sys.stdout = open(os.devnull, "w")
    return device


def world_size():
    """Number of processes of the run (1 without torchrun or with one process)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def get_rank():
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process():
    """Whether this process writes the run's files (rank 0)."""
    return get_rank() == 0


def restart_count():
    """How often torchrun (--max_restarts) has restarted the job: 0 on its first attempt and without torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def local_batch_size(batch_size, flag="--batch_size"):
    """A global batch's share per process; UserError when it does not divide evenly."""
    world = world_size()
    if batch_size % world:
        raise UserError(f"{flag} {batch_size} does not split evenly over {world} processes: give a multiple of "
                        f"{world} (it is the global batch, as in the paper)")
    return batch_size // world


def gather_rows(tensor):
    """Every rank's rows (first dimension) concatenated in rank order, on every rank; the tensor itself in one
    process. Ranks may hold different numbers of rows."""
    if world_size() == 1:
        return tensor
    parts = [None] * world_size()
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts)


def gather_objects(value):
    """[value of rank 0, value of rank 1, ...] on every rank; [value] in one process."""
    if world_size() == 1:
        return [value]
    parts = [None] * world_size()
    dist.all_gather_object(parts, value)
    return parts


def broadcast_from_main(value):
    """Rank 0's value on every rank (the argument of other ranks is ignored)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn, *args):
    """fn(*args) computed once, on rank 0, and its result given to every rank. A UserError of rank 0 is raised
    there and ends the other ranks quietly (exit 2): rank 0 reports it for the job."""
    if world_size() == 1:
        return fn(*args)
    if not is_main_process():
        kind, value = broadcast_from_main(None)
        if kind == "error":
            raise ReportedOnRankZero(value)
        return value
    try:
        value = fn(*args)
    except UserError as exc:
        broadcast_from_main(("error", str(exc)))
        raise
    broadcast_from_main(("value", value))
    return value


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: d(sum)/d(own part) summed over every rank's
    loss. DistributedDataParallel then averages the ranks' gradients, which gives the gradient of the one loss."""

    @staticmethod
    def forward(ctx, tensor):
        """Sum of the tensor over the ranks."""
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        """Sum of the incoming gradients over the ranks."""
        total = grad.clone()
        dist.all_reduce(total)
        return total


def mean_over_ranks(tensor):
    """The mean of a tensor over the ranks, differentiable; the tensor itself in one process."""
    if world_size() == 1:
        return tensor
    return _SumOverRanks.apply(tensor) / world_size()


def wrap_ddp(nets, device, sync_bn):
    """The nets to train: DistributedDataParallel wrappers (BatchNorm synchronised when sync_bn) with several
    processes, the nets themselves in one. SyncBatchNorm keeps the Parameter and buffer objects, so optimizers
    made before stay valid and state_dict keys do not change."""
    if world_size() == 1:
        return list(nets)
    wrapped = []
    for net in nets:
        if sync_bn:
            converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
            assert converted is net, "the root module of a net is no BatchNorm"
        ids = [device.index] if device.type == "cuda" else None
        # BatchNorm buffers are not broadcast at every forward: sync_buffers gives every rank rank 0's at the end
        # of each epoch (with SyncBatchNorm they agree anyway). Newer torch names the switch forward_sync_buffers.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in DDP_PARAMETERS
                   else {"broadcast_buffers": False})
        wrapped.append(DistributedDataParallel(net, device_ids=ids, **no_sync))
    return wrapped


def sync_buffers(nets):
    """Give every rank rank 0's buffers (BatchNorm running statistics): without SyncBatchNorm each rank's running
    statistics follow its own shard, and evaluation and checkpoints need one set."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for net in nets:
            for buffer in net.buffers():
                dist.broadcast(buffer, src=0)


def check_sync_bn(sync_bn, device):
    """The --sync_bn setting in force: on by default under several processes on CUDA; torch's SyncBatchNorm has no
    CPU kernels, so on the CPU it is off (asking for it is an error)."""
    if world_size() == 1:
        return False
    if device.type != "cuda":
        if sync_bn:
            raise UserError("--sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernels): drop it on the CPU, "
                            "where each process keeps BatchNorm statistics of its own shard")
        print("BatchNorm: per-process statistics (SyncBatchNorm needs CUDA)", flush=True)
        return False
    return True if sync_bn is None else sync_bn


class ShardSampler(torch.utils.data.Sampler):
    """DataLoader sampler of this rank's share of a shuffled order drawn by a Shard at each pass."""

    def __init__(self, n, shard):
        """n: samples of the dataset; shard: the run's Shard."""
        self.n, self.shard = n, shard

    def __len__(self):
        """Samples per pass on this rank (the same on every rank)."""
        return -(-self.n // self.shard.world)

    def __iter__(self):
        """This rank's indices of a fresh shuffle."""
        return iter(self.shard.order(self.n).tolist())


class Shard:
    """How data is split over the ranks of a run.

    Training passes: a shuffle drawn from a generator that every rank seeds from --seed and the epoch at the start
    of each epoch and draws from in the same order (so all ranks hold the same order), padded by repeating its
    head to a multiple of the world size as DistributedSampler does, and dealt round-robin: every rank gets the
    same number of samples, so the same number of iterations. Evaluation passes: contiguous spans, no padding, so
    that rows gathered in rank order are the dataset's rows in order, each once.
    """

    def __init__(self, seed, rank, world):
        """seed: --seed; rank and world of this process."""
        self.seed, self.rank, self.world = seed, rank, world
        self.generator = torch.Generator()
        self.numpy = np.random.RandomState()
        self.start_epoch(0)

    def start_epoch(self, epoch):
        """Reseed the shared generators from (seed, epoch): identical on every rank, and after a resume."""
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(2)
        self.generator.manual_seed(int(state[0]))
        self.numpy.seed(int(state[1]))

    def order(self, n):
        """This rank's positions 0..n-1 of a fresh shuffle (a 1-D long tensor of ceil(n / world) entries)."""
        order = torch.randperm(n, generator=self.generator)
        total = -(-n // self.world) * self.world
        if total > n:
            order = order.repeat(-(-total // n))[:total]
        return order[self.rank::self.world]

    def span(self, n):
        """This rank's contiguous range (start, stop) of n rows in order."""
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return start, start + per + (self.rank < extra)

    def sampler(self, n):
        """A DataLoader sampler of this rank's share of a fresh shuffle of n samples at each pass."""
        return ShardSampler(n, self)


def make_shard(seed):
    """The run's Shard with several processes, None in one (the single-process code paths stay as they are)."""
    return Shard(seed, get_rank(), world_size()) if world_size() > 1 else None


def seed_process(seed):
    """Seed the global generators: with --seed in one process, with --seed + rank in each of several (their
    augmentation and MixMatch draws differ; shuffles come from the Shard)."""
    seed_everything((seed + get_rank()) % 2 ** 32)


# ----------------------------------------------------------------------------- atomic files and checkpoints

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
            _link_or_copy(path, keep_previous)
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


def _link_or_copy(src, dst):
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
                        "file written by this project") from exc


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
                            f"{current.get(key)!r}: pass the same value or start a new --output_dir")


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


# ----------------------------------------------------------------------------- the run folder

def _sha256_prefix(path, size):
    """SHA-256 of the first `size` bytes of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while size > 0:
            chunk = f.read(min(size, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            size -= len(chunk)
    return digest.hexdigest()


class RunLogs:
    """The run's text logs (the original code's files) plus a JSON-lines file: append-only, with a running
    size and SHA-256 per file so that a checkpoint can say exactly which log contents belong to it."""

    def __init__(self, paths, enabled=True):
        """paths: name -> file path; nothing is opened until start() or resume(); enabled False: writes nothing
        (the logs of a rank other than 0)."""
        self.paths, self.enabled = paths, enabled
        self.files, self.hashes, self.written = {}, {}, {}

    def existing(self):
        """Paths among this run's logs that exist and hold something (a run that died before logging is not)."""
        return [p for p in self.paths.values() if os.path.exists(p) and os.path.getsize(p) > 0]

    def start(self):
        """Open every log fresh."""
        self.resume({k: {"size": 0} for k in self.paths})

    def resume(self, described):
        """Cut every log back to the size a checkpoint describes (never longer: checked before), then append."""
        for key, path in self.paths.items():
            size = described.get(key, {}).get("size", 0)
            with open(path, "ab") as f:
                f.truncate(size)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                digest.update(f.read(size))
            self.hashes[key], self.written[key] = digest, size
            self.files[key] = open(path, "ab")

    def state(self):
        """{name: {"name": file name, "size": bytes, "sha256": hex}} of what was written so far."""
        return {k: {"name": os.path.basename(self.paths[k]), "size": self.written[k],
                    "sha256": self.hashes[k].hexdigest()} for k in self.paths}

    def write(self, key, text):
        """Append text to one log and flush it; a failed write names the file."""
        if not self.enabled:
            return
        data = text.encode()
        try:
            self.files[key].write(data)
            self.files[key].flush()
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.paths[key]) from None
        self.hashes[key].update(data)
        self.written[key] += len(data)

    def write_json(self, key, record):
        """Append one JSON line."""
        self.write(key, json.dumps(record, sort_keys=False) + "\n")

    def close(self):
        """Close every open log (a failure to flush is reported by the write that caused it)."""
        for f in self.files.values():
            try:
                f.close()
            except OSError:
                pass
        self.files = {}


def _count_logged_epochs(path):
    """Number of epoch records in a JSON-lines log (unreadable lines, e.g. one cut by a kill, do not count)."""
    if not os.path.exists(path):
        return 0
    count = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            count += isinstance(record, dict) and "epoch" in record
    return count


class RunDir:
    """One run's output folder: an exclusive lock, the logs, the config, the checkpoint and the one before it.

    Logs and checkpoint are one unit: a checkpoint records the size and SHA-256 of every log at its epoch, and a
    resume continues only where those exact log contents are present. Used as a context manager around the run:
    entering checks the folder, takes the lock and removes stale temporary files; leaving finishes the checkpoint
    write in flight, closes the logs and turns an interruption or a failed write into one line saying what was
    kept and the command that continues.
    """

    def __init__(self, folder, prefix, log_names, carried=(), main=True):
        """folder: --output_dir; prefix: the run's file-name prefix; log_names: key -> file name in folder, "json"
        among them; carried: suffixes of the run's other files that a continuation in another folder needs;
        main: whether this process writes (rank 0); other ranks only read the checkpoint rank 0 chose."""
        self.folder, self.prefix, self.main = folder, prefix, main
        self.carried = ("_config.json",) + tuple(carried)
        self.logs = RunLogs({k: os.path.join(folder, name) for k, name in log_names.items()}, enabled=main)
        self.ckpt_path = self.path("_checkpoint.pth.tar")
        self.prev_path = self.path("_checkpoint_prev.pth.tar")
        self.config_path = self.path("_config.json")
        self.lock_path = os.path.join(folder, f".{prefix}.lock")
        self.lock_fd = None
        self.writer = None
        self.opened = None  # the checkpoint file open_checkpoint chose
        self.kept_epoch = None  # epoch of the newest checkpoint known to be complete on disk
        self.rotate = False  # whether the current checkpoint may become the previous one on the next save
        self.fork = None  # (folder, checkpoint file) when continuing another folder's checkpoint here
        self.own_checkpoint = False  # whether this process wrote (or copied) the folder's current checkpoint

    def path(self, suffix):
        """A file of this run: <folder>/<prefix><suffix>."""
        return os.path.join(self.folder, self.prefix + suffix)

    # ---- entering and leaving ------------------------------------------------------------------------------

    def __enter__(self):
        """Check that the folder is usable, take the lock, remove this run's stale temporary files (rank 0 only)."""
        if not self.main:
            return self
        try:
            os.makedirs(self.folder, exist_ok=True)
            self.lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise UserError(f"--output_dir {self.folder} is not usable ({exc.strerror or exc}): choose a folder "
                            "you can write to") from None
        try:  # released by the OS when the process dies, so a killed run never blocks the next start
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.lock_fd)
            self.lock_fd = None
            raise UserError(f"another process (pid {holder}) is running {self.prefix} in {self.folder}: wait for it "
                            "to end or choose another --output_dir") from None
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"{os.getpid()}\n".encode(), 0)
        self._remove_stale_temps()
        self.writer = CheckpointWriter(on_error=self._writer_failed)
        return self

    def _remove_stale_temps(self):
        """Delete temporary files a killed process of this run left (the lock guarantees none is in use)."""
        names = [f for f in os.listdir(self.folder) if f.startswith(f".{self.prefix}_") and f.endswith(".tmp")]
        stale = [os.path.join(self.folder, f) for f in names]
        loss_dir = self.path("_losses")
        if os.path.isdir(loss_dir):
            stale += [os.path.join(loss_dir, f) for f in os.listdir(loss_dir) if f.startswith(".")
                      and f.endswith(".tmp")]
        for path in stale:
            os.remove(path)
        if stale:
            print(f"removed {len(stale)} temporary file(s) left by an interrupted write", flush=True)

    def _writer_failed(self):
        """Called in the writer thread when a checkpoint write failed: interrupt the main thread now."""
        _thread.interrupt_main(signal.SIGINT)

    def __exit__(self, exc_type, exc, tb):
        """Finish or discard the write in flight, close the logs, release the lock; explain an early stop."""
        if not self.main:
            if isinstance(exc, KeyboardInterrupt):
                note = f"rank 0 keeps the run's files in {self.folder} and says how to continue"
                if isinstance(exc, Interrupted):
                    exc.note = note
                else:
                    raise Interrupted(signal.SIGINT, note) from None
            return False
        in_main = threading.current_thread() is threading.main_thread()
        # A second Ctrl-C while the last write finishes would only leave a temporary file behind.
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS} if in_main else {}
        write_error = None
        try:
            try:
                self.writer.close()
            except Exception as err:  # the write failed: keep the last good checkpoint, report below
                write_error = err
            self.logs.close()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.lock_fd is not None:
                os.close(self.lock_fd)
                self.lock_fd = None
        if write_error is None and isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            write_error = exc
        if write_error is not None:
            where = getattr(write_error, "filename", None) or self.ckpt_path
            reason = getattr(write_error, "strerror", None) or str(write_error)
            raise UserError(f"cannot write {where} ({reason}): {self.kept()}; make room or fix the folder, then "
                            f"continue with: {self.resume_command()}") from None
        if isinstance(exc, Interrupted):
            exc.note = f"{self.kept()}; continue with: {self.resume_command()}"
        elif isinstance(exc, KeyboardInterrupt):
            raise Interrupted(signal.SIGINT, f"{self.kept()}; continue with: {self.resume_command()}") from None
        return False

    def kept(self):
        """What a stopped run leaves to continue from, in words."""
        if self.kept_epoch is not None:
            return f"the checkpoint of epoch {self.kept_epoch} and the logs up to it are in {self.folder}"
        if self.fork is not None:
            return f"nothing was copied into {self.folder} yet"
        return "no epoch was checkpointed yet, so the run will start again from epoch 0"

    def resume_command(self):
        """The command line that continues this run: the one given with --resume, which names no file once this
        folder holds a checkpoint of its own written (or copied) by this process."""
        argv, rest = [], list(sys.argv)
        while rest:
            arg = rest.pop(0)
            if arg == "--resume" and rest and not rest[0].startswith("-"):
                path = rest.pop(0)
                if not self.own_checkpoint:
                    argv += [arg, path]
            elif arg != "--resume" and not arg.startswith("--resume=") or not self.own_checkpoint:
                argv.append(arg)
        if not any(a == "--resume" or a.startswith("--resume=") for a in argv):
            argv.append("--resume")
        launcher = "torchrun [its options as before] " if "WORLD_SIZE" in os.environ else "python "
        return launcher + shlex.join(argv)

    # ---- deciding how to start -----------------------------------------------------------------------------

    def open_checkpoint(self, resume_arg, defining):
        """The checkpoint to continue from (verified and checked against `defining`), or None for a fresh start.

        resume_arg: None (fresh start), "auto" (this folder's checkpoint), a checkpoint file or a folder holding
        one. Nothing is changed here; whatever would overwrite or garble a run is refused with one line. With
        several processes rank 0 decides and the others load the file it chose (so the folder must be one that
        every node sees). A job restarted by torchrun continues from this folder's checkpoint by itself.
        """
        if restart_count() and (not resume_arg or os.path.exists(self.ckpt_path) or os.path.exists(self.prev_path)):
            print(f"torchrun restart {restart_count()}: continuing from the last checkpoint in {self.folder}",
                  flush=True)
            resume_arg = "auto"
        if world_size() == 1:
            return self._open_checkpoint(resume_arg, defining)
        chosen = {}

        def decide():
            """Rank 0: open the checkpoint; every rank learns which file it was."""
            chosen["checkpoint"] = self._open_checkpoint(resume_arg, defining)
            return self.opened

        path = on_main(decide)
        if self.main:
            return chosen["checkpoint"]
        return None if path is None else load_checkpoint(path)

    def _open_checkpoint(self, resume_arg, defining):
        """open_checkpoint in the process that decides; self.opened is the file chosen (None: a fresh start)."""
        self.opened = None
        has_checkpoint = os.path.exists(self.ckpt_path) or os.path.exists(self.prev_path)
        if not resume_arg:
            if has_checkpoint:
                raise UserError(f"{self.folder} already holds a {self.prefix} run: pass --resume to continue it, or "
                                "choose another --output_dir (nothing was overwritten)")
            self._allow_restart()
            return None
        path = self.ckpt_path if resume_arg == "auto" else resume_arg
        if os.path.isdir(path):
            path = os.path.join(path, os.path.basename(self.ckpt_path))
        if resume_arg == "auto" and not has_checkpoint:
            self._allow_restart()
            print(f"--resume: {self.folder} holds no checkpoint of {self.prefix} yet: starting at epoch 0", flush=True)
            return None
        if resume_arg == "auto" and not os.path.exists(path):
            path = self.prev_path
        if not os.path.isfile(path):
            raise UserError(f"--resume: no checkpoint at {path}: run without --resume to start, or name the file")
        checkpoint = self._load_verified(path)
        self.opened = path
        check_resume_args(checkpoint["args"], defining, defining.keys())
        described = self._described_logs(checkpoint)
        if os.path.samefile(os.path.dirname(os.path.abspath(path)), self.folder):
            self._check_logs(described, self.folder, checkpoint["epoch"], "")
            self._refuse_going_back(path, checkpoint["epoch"])
            self.rotate = os.path.abspath(path) == os.path.abspath(self.ckpt_path)
            self.kept_epoch = checkpoint["epoch"]
        else:
            self._check_fork(path, checkpoint, described)
        return checkpoint

    def _allow_restart(self):
        """Refuse a fresh start over logs, unless they are what a run killed before its first checkpoint left."""
        if not self.logs.existing():
            return
        logged = _count_logged_epochs(self.logs.paths["json"])
        if not restartable(logged):
            raise UserError(f"{self.folder} holds logs of {logged} epochs of a {self.prefix} run but no checkpoint: "
                            "move them away or choose another --output_dir (nothing was overwritten)")
        print(f"{self.folder} holds a {self.prefix} run stopped before its first checkpoint ({logged} epoch(s) "
              "logged): starting it again", flush=True)

    def _load_verified(self, path):
        """Load a checkpoint after checking every record's CRC; a damaged one names the fallback."""
        problem = verify_checkpoint(path)
        if problem is not None:
            other = {os.path.abspath(self.ckpt_path): self.prev_path,
                     os.path.abspath(self.prev_path): self.ckpt_path}.get(os.path.abspath(path))
            if other and os.path.exists(other) and verify_checkpoint(other) is None:
                epoch = load_checkpoint(other, mmap=True).get("epoch")
                raise UserError(f"checkpoint {path} is damaged ({problem}); nothing was changed: the other "
                                f"checkpoint {other} (epoch {epoch}) is intact, continue from it with --resume {other}")
            raise UserError(f"checkpoint {path} is damaged ({problem}) and no intact checkpoint of this run is "
                            "left: start again in a new --output_dir")
        return load_checkpoint(path)

    def _described_logs(self, checkpoint):
        """The log contents a checkpoint belongs with: {key: {name, size, sha256 (None: not recorded)}}."""
        if "logs" in checkpoint:
            return checkpoint["logs"]
        # checkpoints written before log digests were recorded hold only the sizes
        return {k: {"name": os.path.basename(self.logs.paths[k]), "size": size, "sha256": None}
                for k, size in checkpoint.get("log_sizes", {}).items() if k in self.logs.paths}

    def _check_logs(self, described, folder, epoch, purpose):
        """UserError unless every log in folder begins with exactly the contents the checkpoint recorded."""
        for key, d in described.items():
            path = os.path.join(folder, d["name"])
            if not os.path.exists(path):
                problem = "is missing"
            elif os.path.getsize(path) < d["size"]:
                problem = f"holds {os.path.getsize(path)} bytes, fewer than the {d['size']} the checkpoint recorded"
            elif d.get("sha256") and _sha256_prefix(path, d["size"]) != d["sha256"]:
                problem = f"does not begin with the {d['size']} bytes the checkpoint recorded (another run's log?)"
            else:
                continue
            raise UserError(f"--resume: log {path} {problem}{purpose}: a checkpoint (epoch {epoch}) continues only "
                            "with its own logs; put them back or start a new --output_dir (nothing was changed)")

    def _refuse_going_back(self, path, epoch):
        """Refuse resuming an older checkpoint where this folder's own intact checkpoint is newer (it would cut)."""
        if os.path.abspath(path) == os.path.abspath(self.ckpt_path) or not os.path.exists(self.ckpt_path):
            return
        if verify_checkpoint(self.ckpt_path) is not None:
            return  # the folder's checkpoint is damaged: going back to an older one is the way on
        newest = load_checkpoint(self.ckpt_path, mmap=True).get("epoch")
        if newest is not None and newest > epoch:
            raise UserError(f"--resume {path} (epoch {epoch}) would cut the run in {self.folder}, whose checkpoint is "
                            f"at epoch {newest}: continue that one (plain --resume), or this one in a new "
                            "--output_dir (nothing was changed)")

    def _check_fork(self, path, checkpoint, described):
        """A checkpoint from another folder continues here only into an empty run, with its logs copied over."""
        if self.logs.existing() or os.path.exists(self.ckpt_path) or os.path.exists(self.prev_path):
            raise UserError(f"--resume {path}: {self.folder} already holds a {self.prefix} run of its own; continue a "
                            "checkpoint of another folder in a new --output_dir (nothing was changed)")
        source = os.path.dirname(os.path.abspath(path))
        self._check_logs(described, source, checkpoint["epoch"], " (its logs up to the checkpoint are copied here)")
        self.fork = (source, path)

    def check_labels(self, checkpoint, defining, labels, source):
        """Add the training labels' digest to the defining arguments; UserError when the checkpoint's differs."""
        digest = defining["labels_sha256"] = labels_digest(labels)
        saved = checkpoint["args"].get("labels_sha256") if checkpoint else None
        if saved is not None and saved != digest:
            raise UserError(f"--resume: the training labels from {source} differ from those the checkpoint was "
                            "trained on: pass the noise file / data the run was made with, or start a new "
                            "--output_dir")

    # ---- starting, continuing, saving ----------------------------------------------------------------------

    def begin(self, config):
        """Fresh start: write the run's config and open its logs."""
        if not self.main:
            return
        atomic_json(config, self.config_path)
        self.logs.start()

    def restore(self, checkpoint, nets, optimizers):
        """Continue: nets, optimizers, logs cut back to (or copied up to) the checkpoint, RNG states. Next epoch."""
        for net, opt, net_state, opt_state in zip(nets, optimizers, checkpoint["nets"], checkpoint["optimizers"]):
            net.load_state_dict(net_state)
            opt.load_state_dict(opt_state)
        if not self.main:
            restore_rng(checkpoint, checkpoint["args"]["seed"])
            return checkpoint["epoch"] + 1
        described = self._described_logs(checkpoint)
        if self.fork is not None:
            # the new folder becomes a whole run at the checkpoint's epoch: its logs, its config and other files,
            # and the checkpoint itself (a hard link: checkpoints are only ever replaced, never changed in place)
            source, source_checkpoint = self.fork
            for key, d in described.items():
                src = os.path.join(source, d["name"])
                atomic_write(self.logs.paths[key], lambda f, src=src, n=d["size"]: f.write(open(src, "rb").read(n)))
            for suffix in self.carried:
                src = os.path.join(source, checkpoint.get("prefix", self.prefix) + suffix)
                if os.path.exists(src):
                    _link_or_copy(src, self.path(suffix))
            _link_or_copy(source_checkpoint, self.ckpt_path)
            self.rotate = self.own_checkpoint = True
            print(f"continuing the run of {source} from its epoch {checkpoint['epoch']} here; its checkpoint, its logs "
                  "up to that epoch and its " + ", ".join(s.lstrip("_") for s in self.carried) + " were copied",
                  flush=True)
        self.logs.resume(described)
        restore_rng(checkpoint, checkpoint["args"]["seed"])
        self.kept_epoch = checkpoint["epoch"]
        print(f"resumed from epoch {checkpoint['epoch']}", flush=True)
        return checkpoint["epoch"] + 1

    def save(self, state):
        """Write the checkpoint of state["epoch"] in the background; the one it replaces becomes the previous."""
        if not self.main:
            return
        self.writer.wait()  # the write before must have landed to decide whether it becomes the previous one
        state = dict(state, logs=self.logs.state(), prefix=self.prefix)

        def done(epoch=state["epoch"]):
            """The write landed: it is what a stop keeps, and it may become the previous checkpoint."""
            self.kept_epoch, self.rotate, self.own_checkpoint = epoch, True, True

        self.writer.save(state, self.ckpt_path, self.prev_path if self.rotate else None, done)


def run_config(script, args, device, num_train, sources=None, **extra):
    """How a run was started, written once at its fresh start as <prefix>_config.json."""
    return {"args": vars(args), "sources": sources or {}, "num_train": num_train, "device": str(device),
            "torch": torch.__version__, "script": script, **extra}


def json_safe(value):
    """NaN and infinities become null so every log line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def timed(fn, *args):
    """fn(*args) and the seconds it took."""
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


class Progress:
    """Compact progress line for one phase; reads device values only when it prints."""

    def __init__(self, desc, total, every=None, stream=None):
        """total: iterations expected; every: print period (default: about ten lines a phase)."""
        self.desc, self.total = desc, max(int(total), 1)
        self.every = every or max(self.total // 10, 1)
        self.stream = stream or sys.stdout
        # On a terminal the line is redrawn in place; in a log file a line is printed every `every` steps.
        self.tty = self.stream.isatty()
        if self.tty:
            self.every = max(self.total // 100, 1)
        self.start = time.perf_counter()

    def update(self, step, **values):
        """Print after iteration `step` (1-based) when due; values may be tensors (synced only then)."""
        if step % self.every and step != self.total:
            return
        shown = "  ".join(f"{k} {float(v):.4f}" for k, v in values.items())
        rate = step / max(time.perf_counter() - self.start, 1e-9)
        line = f"{self.desc} [{step:>4}/{self.total}] {shown}  {rate:.1f} it/s"
        if self.tty:
            end = "\n" if step == self.total else ""
            print("\r" + line + "\033[K", end=end, file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)
