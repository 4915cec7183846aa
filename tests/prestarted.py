"""A prestarted interpreter for the tests' training processes: a script starts in milliseconds instead of seconds.

A training script spends 3-6 s of a 2-core CPU importing torch, torchvision and scikit-learn before its first
step, and the suite starts a few hundred of them. Here one server per pytest process imports those once and forks a
fresh process per run; the tests still start a real command and see a real process:

    python tests/prestarted.py SCRIPT ARGS...     (the client: what a test runs instead of `python SCRIPT ARGS...`)
    python tests/prestarted.py -m MODULE ARGS...  (instead of `python -m MODULE ARGS...`, e.g. torchrun)
    python tests/prestarted.py -c CODE ARGS...    (instead of `python -c CODE ARGS...`)

The client is a light process (no torch) that hands its stdin, stdout and stderr, its working folder, environment
and arguments to the server, forwards the stop signals it receives (SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2) to
the forked run and ends with the run's exit code, or by the run's signal. The run is `SCRIPT` as `__main__`, as
`python SCRIPT` runs it: sys.argv, sys.path[0], a fresh module table for everything outside the preloaded
libraries, freshly seeded `random` and numpy, Python's exit codes, tracebacks, atexit handlers and buffering.
Without a server (the variable PRESTARTED_SOCKET unset, or nothing listening) the client becomes
`python SCRIPT ARGS...` itself, so every test passes either way, only slower.

What it cannot give: the run's pid is not the client's (a test that reads a pid from the run's lock file, or that
kills it with SIGKILL, which cannot be forwarded, starts the script directly), and environment variables read
while torch is imported (OMP_NUM_THREADS, ...) are the server's.

    python tests/prestarted.py --serve SOCKET     (the server; tests/conftest.py starts one per pytest process)
"""
import json
import os
import signal
import socket
import struct
import sys

SOCKET_VARIABLE = "PRESTARTED_SOCKET"
COMMAND = os.path.abspath(__file__)  # `python COMMAND ...`: the client, or with --serve the server
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The entry points whose imports the server preloads; the project's own modules are then dropped again, so that
# each run imports them fresh from its own sys.path.
PRELOADED_FROM = ("Train_cifar", "Train_clothing1M", "Train_webvision", "Train_custom", "bench")


# ---- the client -----------------------------------------------------------------------------------------------

def _send_request(sock, argv):
    """Send the request (arguments, folder, environment) with this process's stdin, stdout and stderr."""
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:  # a closed standard stream becomes /dev/null, as it would for the run's own children
            fds.append(os.open(os.devnull, os.O_RDWR))
    socket.send_fds(sock, [struct.pack("!Q", len(payload)) + payload], fds)


def client(argv):
    """Run argv (SCRIPT ARGS...) in a process forked from the server; end as that process ended."""
    path = os.environ.get(SOCKET_VARIABLE)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not path or not argv or (argv[0].startswith("-") and argv[0] not in ("-m", "-c")):  # -W, -u, ...
            raise FileNotFoundError(SOCKET_VARIABLE)
        sock.connect(path)
    except OSError:
        os.execv(sys.executable, [sys.executable, *argv])
    pending, pid = [], []

    def forward(signum, frame):
        """Pass a stop signal on to the run (or keep it until the run's pid is known)."""
        if pid:
            os.kill(pid[0], signum)
        else:
            pending.append(signum)
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    _send_request(sock, argv)
    replies = sock.makefile("r")
    pid.append(int(replies.readline()))
    for signum in pending:
        os.kill(pid[0], signum)
    line = replies.readline()
    code = int(line) if line else 1  # no status: the server died with the run
    if code < 0:  # the run was killed by a signal: so is this process
        if -code in FORWARDED_SIGNALS:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


# ---- the server -----------------------------------------------------------------------------------------------

def _preload():
    """Import the entry points' libraries once; forget the project's own modules again."""
    sys.path.insert(0, ROOT)
    for name in PRELOADED_FROM:
        __import__(name)
    for name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None)
        if where and os.path.dirname(os.path.abspath(where)) == ROOT:
            del sys.modules[name]
    sys.path.remove(ROOT)


def _recv_request(conn):
    """The request and the client's three standard file descriptors."""
    header, fds, _, _ = socket.recv_fds(conn, 8, 3)
    size, = struct.unpack("!Q", header)
    payload = b""
    while len(payload) < size:
        chunk = conn.recv(size - len(payload))
        if not chunk:
            raise EOFError("the client left")
        payload += chunk
    return json.loads(payload), fds


def _standard_streams(unbuffered):
    """sys.stdin/stdout/stderr on descriptors 0-2, buffered as a fresh interpreter's would be."""
    import io
    buffering = 0 if unbuffered else -1
    encoding = sys.stdout.encoding
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(open(0, "rb", closefd=False), encoding=encoding)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(open(1, "wb", buffering=buffering, closefd=False),
                                                   encoding=encoding, write_through=unbuffered)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(open(2, "wb", buffering=buffering, closefd=False),
                                                   encoding=encoding, errors="backslashreplace",
                                                   line_buffering=True, write_through=unbuffered)


def _exit_code(code):
    """The exit status Python gives a SystemExit's code."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _run(request, fds):
    """In the forked run: become `python SCRIPT ARGS...` in the client's place, run it, exit. Never returns."""
    import atexit
    import random
    import runpy
    import threading
    import traceback
    os.setpgid(0, 0)  # a group of its own: when the client dies, the monitor kills the run with its children
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    server_pythonpath = os.environ.get("PYTHONPATH", "")
    os.environ.clear()
    os.environ.update(request["env"])
    _standard_streams(bool(os.environ.get("PYTHONUNBUFFERED")))
    argv = request["argv"]
    base = [p for p in sys.path[1:] if p not in server_pythonpath.split(os.pathsep)]
    extra = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if argv[0] == "-m":  # python -m: the working folder first on the path, sys.argv[0] set by runpy
        sys.argv = argv[1:]
        sys.path[:] = [os.getcwd(), *extra, *base]
        start = lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True)  # noqa: E731
    elif argv[0] == "-c":  # python -c: sys.argv[0] is "-c", the working folder first on the path
        sys.argv = ["-c", *argv[2:]]
        sys.path[:] = ["", *extra, *base]
        main = sys.modules["__main__"] = type(sys)("__main__")
        start = lambda: exec(compile(argv[1], "<string>", "exec"), main.__dict__)  # noqa: E731
    else:
        sys.argv = list(argv)
        sys.path[:] = [os.path.dirname(os.path.abspath(argv[0])), *extra, *base]
        start = lambda: runpy.run_path(argv[0], run_name="__main__")  # noqa: E731
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    code, killed_by = 0, None
    try:
        start()
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:  # Python prints it and then dies by SIGINT
        traceback.print_exc()
        code, killed_by = 1, signal.SIGINT
    except BaseException:  # noqa: BLE001 - what Python's top level does with any other exception
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # wait for non-daemon threads, as the interpreter does at exit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if killed_by is not None:
        signal.signal(killed_by, signal.SIG_DFL)
        os.kill(os.getpid(), killed_by)
    os._exit(code)


def _monitor(conn):
    """One client: fork its run, tell it the pid, then its exit status; kill the run if the client dies first."""
    import select
    request, fds = _recv_request(conn)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run(request, fds)
    for fd in fds:
        os.close(fd)
    conn.sendall(f"{pid}\n".encode())
    pidfd = os.pidfd_open(pid)
    while True:
        ready, _, _ = select.select([conn, pidfd], [], [])
        if pidfd in ready:
            _, status = os.waitpid(pid, 0)
            try:
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:
                pass
            return
        if not conn.recv(1):  # the client is gone (killed with SIGKILL): so goes its run, with its children
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return


def serve(path):
    """Preload, then listen on path; fork a monitor per client. Ends when the process that started it ends."""
    try:
        os.close(os.pidfd_open(os.getpid()))  # Linux 5.3 or later; elsewhere no server: the clients run plainly
    except (AttributeError, OSError):
        return
    _preload()
    parent = os.getppid()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the monitors are reaped automatically
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the test run reaches the clients, not this
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".binding")
    listener.listen(64)
    os.rename(path + ".binding", path)  # clients find the socket only once the libraries are loaded
    listener.settimeout(1.0)
    while os.getppid() == parent:
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                _monitor(conn)
            finally:
                os._exit(0)
        conn.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2])
    else:
        client(sys.argv[1:])
