"""The run folder: its lock, logs, config and checkpoints, and how a run starts, resumes and stops."""
import _thread
import fcntl
import hashlib
import json
import os
import shlex
import signal
import sys
import threading

import torch

from checkpointing import (WRITE_ERRNOS, CheckpointWriter, atomic_json, atomic_write, check_resume_args, labels_digest,
                           link_or_copy, load_checkpoint, restore_rng, verify_checkpoint)
from cli import STOP_SIGNALS, Interrupted, UserError, see_doc
from distributed import on_main, restart_count, world_size
from rundirs import LOSSES_SUFFIX, loss_snapshots, restartable
import tensorboard_log

# Where the refusals of --resume and of a fresh start over a run are explained.
RESUME_DOC = see_doc("Resume")


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


def launcher():
    """How this process was started, as a command line begins: torchrun (which sets TORCHELASTIC_RUN_ID and the
    ranks' variables) or this very interpreter, so a copied command runs where this one ran."""
    if any(name in os.environ for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE")):
        return "torchrun [its options as before]"
    return shlex.quote(sys.executable or "python")


def _missing_folders(folder):
    """The folders os.makedirs(folder) would create, deepest first."""
    missing = []
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


class RunDir:
    """One run's output folder: an exclusive lock, the logs, the config, the checkpoint and the one before it.

    Logs and checkpoint are one unit: a checkpoint records the size and SHA-256 of every log at its epoch, and a
    resume continues only where those exact log contents are present. Used as a context manager around the run:
    entering checks the folder, takes the lock and removes stale temporary files; leaving finishes the checkpoint
    write in flight, closes the logs and turns an interruption or a failed write into one line saying what was
    kept and the command that continues.
    """

    def __init__(self, folder, prefix, log_names, carried=(), main=True, tensorboard=False):
        """folder: --output_dir; prefix: the run's file-name prefix; log_names: key -> file name in folder, "json"
        among them; carried: suffixes of the run's other files that a continuation in another folder needs;
        main: whether this process writes (rank 0); other ranks only read the checkpoint rank 0 chose;
        tensorboard: also write each epoch's record as TensorBoard events (--tensorboard)."""
        self.folder, self.prefix, self.main = folder, prefix, main
        self.tensorboard, self.board = tensorboard and main, None
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
        self.created_folders, self.created_lock = [], False  # what entering made: removed again on a refusal
        self.wrote = False  # whether the run has written its config or logs (a refusal after that keeps them)

    def path(self, suffix):
        """A file of this run: <folder>/<prefix><suffix>."""
        return os.path.join(self.folder, self.prefix + suffix)

    # ---- entering and leaving ------------------------------------------------------------------------------

    def __enter__(self):
        """Check that the folder is usable, take the lock, remove this run's stale temporary files (rank 0 only)."""
        if not self.main:
            return self
        if self.tensorboard:
            tensorboard_log.check_installed()
        # What this start creates, so that a refusal before the run writes anything takes it away again.
        self.created_folders = _missing_folders(self.folder)
        try:
            os.makedirs(self.folder, exist_ok=True)
            while True:
                self.created_lock = not os.path.exists(self.lock_path)
                self.lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
                try:  # released by the OS when the process dies, so a killed run never blocks the next start
                    fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(self.lock_fd, 32, 0).decode(errors="replace").strip() or "?"
                    os.close(self.lock_fd)
                    self.lock_fd = None
                    self.created_lock = False  # the holder's file now, whoever created it
                    raise UserError(f"another process (pid {holder}) is running {self.prefix} in {self.folder}: "
                                    f"wait for it to end or choose another --output_dir{see_doc('Several processes')}"
                                    ) from None
                # A refused start removes the lock file it created: a lock taken on a removed file holds nothing.
                if os.path.exists(self.lock_path) and os.path.samestat(os.stat(self.lock_path),
                                                                       os.fstat(self.lock_fd)):
                    break
                os.close(self.lock_fd)
                self.lock_fd = None
        except OSError as exc:
            self._remove_created()
            raise UserError(f"--output_dir {self.folder} is not usable ({exc.strerror or exc}): choose a folder "
                            "you can write to") from None
        except UserError:
            self._remove_created()
            raise
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"{os.getpid()}\n".encode(), 0)
        self._remove_stale_temps()
        self.writer = CheckpointWriter(on_error=self._writer_failed)
        return self

    def _remove_created(self):
        """Take away the lock file and the folders this start created (the folders only while empty)."""
        if self.created_lock:
            try:
                os.remove(self.lock_path)
            except OSError:
                pass
            self.created_lock = False
        for folder in self.created_folders:  # deepest first
            try:
                os.rmdir(folder)
            except OSError:
                break
        self.created_folders = []

    def _remove_stale_temps(self):
        """Delete temporary files a killed process of this run left (the lock guarantees none is in use)."""
        names = [f for f in os.listdir(self.folder) if f.startswith(f".{self.prefix}_") and f.endswith(".tmp")]
        stale = [os.path.join(self.folder, f) for f in names]
        loss_dir = self.path(LOSSES_SUFFIX)
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
            if self.board is not None:
                self.board.close()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.lock_fd is not None:
                if isinstance(exc, UserError) and not self.wrote:
                    self._remove_created()  # a refused start leaves nothing behind (removed while still locked)
                os.close(self.lock_fd)
                self.lock_fd = None
        if write_error is None and isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            write_error = exc
        if write_error is not None:
            where = getattr(write_error, "filename", None) or self.ckpt_path
            reason = getattr(write_error, "strerror", None) or str(write_error)
            raise UserError(f"cannot write {where} ({reason}): {self.kept()}; make room or fix the folder"
                            f"{see_doc('Disk full and interrupted runs')}, then continue with: "
                            f"{self.resume_command()}") from None
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
        return launcher() + " " + shlex.join(argv)

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
                                f"choose another --output_dir (nothing was overwritten){RESUME_DOC}")
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
            raise UserError(f"--resume: no checkpoint at {path}: run without --resume to start, or name the file"
                            f"{RESUME_DOC}")
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
                            f"move them away or choose another --output_dir (nothing was overwritten){RESUME_DOC}")
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
                                f"checkpoint {other} (epoch {epoch}) is intact, continue from it with --resume {other}"
                                f"{RESUME_DOC}")
            raise UserError(f"checkpoint {path} is damaged ({problem}) and no intact checkpoint of this run is "
                            f"left: start again in a new --output_dir{RESUME_DOC}")
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
                            "with its own logs; put them back or start a new --output_dir (nothing was changed)"
                            f"{RESUME_DOC}")

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
                            f"--output_dir (nothing was changed){RESUME_DOC}")

    def _check_fork(self, path, checkpoint, described):
        """A checkpoint from another folder continues here only into an empty run, with its logs copied over."""
        if self.logs.existing() or os.path.exists(self.ckpt_path) or os.path.exists(self.prev_path):
            raise UserError(f"--resume {path}: {self.folder} already holds a {self.prefix} run of its own; continue a "
                            f"checkpoint of another folder in a new --output_dir (nothing was changed){RESUME_DOC}")
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
                            f"--output_dir{RESUME_DOC}")

    # ---- starting, continuing, saving ----------------------------------------------------------------------

    def begin(self, config):
        """Fresh start: write the run's config and open its logs."""
        if not self.main:
            return
        self.wrote = True
        atomic_json(config, self.config_path)
        self.logs.start()
        if self.tensorboard:
            self.board = tensorboard_log.Board(self.folder, self.prefix, 0)

    def restore(self, checkpoint, nets, optimizers):
        """Continue: nets, optimizers, logs cut back to (or copied up to) the checkpoint, RNG states. Next epoch."""
        for net, opt, net_state, opt_state in zip(nets, optimizers, checkpoint["nets"], checkpoint["optimizers"]):
            net.load_state_dict(net_state)
            opt.load_state_dict(opt_state)
        if not self.main:
            restore_rng(checkpoint, checkpoint["args"]["seed"])
            return checkpoint["epoch"] + 1
        described = self._described_logs(checkpoint)
        self.wrote = True
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
                    link_or_copy(src, self.path(suffix))
            source_losses = os.path.join(source, checkpoint.get("prefix", self.prefix) + LOSSES_SUFFIX)
            carried = [src for epoch, src in loss_snapshots(source_losses).items() if epoch <= checkpoint["epoch"]]
            if carried:  # the loss snapshots up to the checkpoint are logs too
                os.makedirs(self.path(LOSSES_SUFFIX), exist_ok=True)
            for src in carried:
                link_or_copy(src, os.path.join(self.path(LOSSES_SUFFIX), os.path.basename(src)))
            link_or_copy(source_checkpoint, self.ckpt_path)
            self.rotate = self.own_checkpoint = True
            print(f"continuing the run of {source} from its epoch {checkpoint['epoch']} here; its checkpoint, its logs "
                  "up to that epoch and its " + ", ".join(s.lstrip("_") for s in self.carried) + " were copied",
                  flush=True)
        self.logs.resume(described)
        if self.tensorboard:  # events of epochs after the checkpoint's are purged
            self.board = tensorboard_log.Board(self.folder, self.prefix, checkpoint["epoch"] + 1)
        restore_rng(checkpoint, checkpoint["args"]["seed"])
        self.kept_epoch = checkpoint["epoch"]
        print(f"resumed from epoch {checkpoint['epoch']}", flush=True)
        return checkpoint["epoch"] + 1

    def record_epoch(self, record, histograms=None):
        """An epoch's JSON record into the JSON log, and with --tensorboard its numbers and histograms ({tag:
        array}) as events."""
        self.logs.write_json("json", record)
        if self.board is not None:
            self.board.epoch(record, histograms)

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
