"""How every script of the project ends: a user error is one line and exit code 2, SIGINT / SIGTERM one line and
exit code 130 / 143, never a traceback. Free of torch, so report.py and plots.py start without loading it."""
import os
import signal
import sys

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Where the fixes of the one-line errors are explained: the file and its sections.
ERRORS_DOC = "docs/errors.md"
ERRORS_DOC_SECTIONS = ("Missing or bad data", "Noise files", "Resume", "Disk full and interrupted runs",
                       "Several processes", "SLURM")


def see_doc(section):
    """' (docs/errors.md, <section>)': what an error line adds to name the section that explains its fix."""
    if section not in ERRORS_DOC_SECTIONS:
        raise ValueError(f"{ERRORS_DOC} has no section {section!r}")
    return f" ({ERRORS_DOC}, {section})"


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""


class ReportedOnRankZero(UserError):
    """A user error rank 0 found and reported for the whole job: the other ranks exit 2 without a line."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. A KeyboardInterrupt: no `except Exception` swallows it, and DataLoader worker
    processes (which inherit the handler) leave quietly, as they do on Ctrl-C."""

    def __init__(self, signum, note="nothing of a run had been written yet"):
        """signum: the signal; note: what was kept and how to continue (filled in by the run folder)."""
        super().__init__(signal.Signals(signum).name)
        self.signum, self.note = signum, note


def _raise_interrupted(signum, frame):
    """Signal handler: stop the main thread where it is; the run folder finishes what must be finished."""
    raise Interrupted(signum)


def _end_process_group(together=False):
    """Destroy torch.distributed's process group when one is up (after a barrier when every rank ended normally);
    never imports torch itself."""
    # A process group exists only if the script imported torch.distributed: a torch-free script skips all this.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        if together:
            # a rank that tears its gloo group down while rank 0 still finishes its epoch (the checkpoint write)
            # can abort in gloo's threads ("terminate called without an active exception"): leave together
            dist.barrier()
        dist.destroy_process_group()


def run_main(main, args):
    """Call main(args). UserError: one line, exit 2. SIGINT / SIGTERM: one line, exit 130 / 143. No traceback."""
    previous = {s: signal.signal(s, _raise_interrupted) for s in STOP_SIGNALS}
    # Under torchrun every rank's stderr reaches the console: a rank other than 0 says which it is.
    who = f"rank {os.environ['RANK']}: " if os.environ.get("RANK", "0") != "0" else ""
    try:
        result = main(args)
        _end_process_group(together=True)  # only here: after an error the other ranks may never reach a barrier
        return result
    except ReportedOnRankZero:
        sys.exit(2)
    except UserError as exc:
        print(f"error: {who}{exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Interrupted as exc:
        print(f"stopped by {exc}: {who}{exc.note}", file=sys.stderr, flush=True)
        sys.exit(128 + exc.signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _end_process_group()
