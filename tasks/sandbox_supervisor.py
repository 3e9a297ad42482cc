"""The sandbox's supervisor: trusted code run as a script inside the sandbox (tasks/sandbox.py).

It is never imported by the trainer: :func:`tasks.sandbox.run_python` copies this file
into the sandbox and runs it with the run's JSON config. It forks the solution process,
which closes the report pipe, drops privileges and applies the limits before running
the user's code; it waits up to the wall-time limit, kills what is left, and writes its
JSON report to the pipe only it holds. Standard library only.
"""

import ctypes
import json
import os
import resource
import runpy
import select
import signal
import sys
import time
import traceback

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36
MAX_VALUE_BYTES = 16 * 1024 * 1024


def prctl(option, value):
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def block_sockets():
    """Clear errors for accidental network use; the OS sandbox is the real boundary."""
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network access is disabled in the code sandbox")

    class NoSocket:
        def __init__(self, *args, **kwargs):
            no_network()

    socket.socket = NoSocket
    for name in ("create_connection", "socketpair", "getaddrinfo", "fromfd"):
        setattr(socket, name, no_network)


def confine(cfg):
    """Drop to the sandbox uid (root only) and apply the limits; runs before user code."""
    uid = cfg["uid"]
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid switch, which clears it
    mib = 1024 * 1024
    limits = [
        (resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1),
        (resource.RLIMIT_AS, cfg["memory_mb"] * mib, cfg["memory_mb"] * mib),
        (resource.RLIMIT_FSIZE, cfg["output_mb"] * mib, cfg["output_mb"] * mib),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if cfg["max_processes"] is not None:
        limits.append((resource.RLIMIT_NPROC, cfg["max_processes"], cfg["max_processes"]))
    for which, soft, hard in limits:
        resource.setrlimit(which, (soft, hard))


def run_solution(cfg, value_fd):
    confine(cfg)
    block_sockets()
    solution = cfg["solution"]
    sys.argv = [solution]
    if cfg["func_name"] is None:
        runpy.run_path(solution, run_name="__main__")
        return
    func_name = cfg["func_name"]
    args = json.loads(sys.stdin.read())
    namespace = runpy.run_path(solution, run_name="solution")
    if "Solution" in namespace and hasattr(namespace["Solution"], func_name):
        target = getattr(namespace["Solution"](), func_name)
    elif func_name in namespace:
        target = namespace[func_name]
    else:
        raise NameError(f"the solution defines no function {func_name!r}")
    data = json.dumps(target(*args)).encode()
    while data:
        data = data[os.write(value_fd, data) :]


def solution_main(cfg, value_fd):
    status = 0
    try:
        run_solution(cfg, value_fd)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            status = (exc.code or 0) & 0xFF
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def wait_for_solution(pid, value_r, deadline):
    """(wait status, or None at the deadline; the value's bytes; whether it was too large)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    os.set_blocking(value_r, False)
    chunks, size, too_large, eof = [], 0, False, False

    def drain():
        nonlocal size, too_large, eof
        while not (eof or too_large):
            try:
                chunk = os.read(value_r, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                eof = True
            elif size + len(chunk) > MAX_VALUE_BYTES:
                too_large = True
            else:
                chunks.append(chunk)
                size += len(chunk)

    while True:
        waited, status = os.waitpid(pid, os.WNOHANG)
        if waited:
            drain()
            return status, b"".join(chunks), too_large
        if too_large:
            try:
                os.kill(pid, signal.SIGKILL)
            except PermissionError:  # another uid (bwrap as root): our exit ends the namespace
                return None, b"", True
            return os.waitpid(pid, 0)[1], b"", True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, b"", False
        watch = ([] if eof or too_large else [value_r]) + ([] if pidfd is None else [pidfd])
        timeout = remaining if pidfd is not None else min(remaining, 0.02)
        if watch:
            select.select(watch, [], [], timeout)
        else:
            time.sleep(timeout)
        drain()


def children_of(parent):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry))
    return found


def kill_descendants():
    """As child subreaper, every orphaned descendant is our child: kill and reap until none."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            kids = children_of(os.getpid())
        except OSError:
            return
        if not kids:
            return
        for kid in kids:
            try:
                os.kill(kid, signal.SIGKILL)
            except OSError:
                pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        time.sleep(0.002)


def main():
    cfg = json.loads(sys.argv[1])
    report_fd = cfg["report_fd"]
    prctl(PR_SET_DUMPABLE, 0)
    if cfg["reap"]:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    value_r, value_w = os.pipe()
    deadline = time.monotonic() + cfg["wall_s"]
    pid = os.fork()
    if pid == 0:
        os.close(report_fd)
        os.close(value_r)
        solution_main(cfg, value_w)
    os.close(value_w)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a solution's SIGINT must not end the report
    status, value, too_large = wait_for_solution(pid, value_r, deadline)
    if status is None:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if cfg["reap"]:
        kill_descendants()
    report = {
        "timed_out": status is None and not too_large,
        "exit_code": None,
        "signal": None,
        "value": None,
    }
    if status is not None:
        if os.WIFSIGNALED(status):
            report["signal"] = os.WTERMSIG(status)
        else:
            report["exit_code"] = os.waitstatus_to_exitcode(status)
    if too_large:
        report["value_error"] = f"return value larger than {MAX_VALUE_BYTES} bytes"
    elif value:
        report["value"] = value.decode("utf-8", "replace")
    data = json.dumps(report).encode()
    while data:
        data = data[os.write(report_fd, data) :]
    os._exit(0)


if __name__ == "__main__":
    main()
