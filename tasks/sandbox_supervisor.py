"""The sandbox's supervisor: trusted code run as a script inside the sandbox (tasks/sandbox.py).

It is never imported by the trainer: :func:`tasks.sandbox.run_python` copies this file
into the sandbox and runs it with the run's JSON config. It installs a seccomp filter
that refuses new user namespaces (inherited by everything it forks), forks the solution
process, which closes the report pipe, drops privileges and applies the limits before
running the user's code; it waits up to the wall-time limit while it sums the resident
memory of every process of the solution, kills what is left (or what holds too much),
and writes its JSON report to the pipe only it holds. Standard library only.
"""

import ctypes
import json
import os
import platform
import resource
import runpy
import select
import signal
import struct
import sys
import time
import traceback

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36
PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, SECCOMP_MODE_FILTER = 22, 38, 2
MAX_VALUE_BYTES = 16 * 1024 * 1024
#: Seconds between two sums of the solution's resident memory.
MEMORY_POLL_S = 0.05
PAGE = os.sysconf("SC_PAGE_SIZE")

#: Per architecture: the seccomp audit value and the syscalls the filter looks at.
SYSCALLS = {
    "x86_64": (0xC000003E, {"clone": 56, "unshare": 272, "setns": 308, "clone3": 435}),
    "aarch64": (0xC00000B7, {"clone": 220, "unshare": 97, "setns": 268, "clone3": 435}),
}
CLONE_NEWUSER = 0x10000000
EPERM, ENOSYS = 1, 38


def prctl(option, value):
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def userns_filter():
    """The BPF program that refuses new user namespaces, or None on an unknown architecture.

    ``unshare`` and ``clone`` with CLONE_NEWUSER and ``setns`` fail with EPERM; ``clone3``
    (whose flags a filter cannot read) fails with ENOSYS, so the C library falls back to
    ``clone``; so does every syscall of another ABI (i386, x32), which could bypass it.
    """
    machine = platform.machine()
    if machine not in SYSCALLS or sys.byteorder != "little":
        return None
    arch, nr = SYSCALLS[machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, deny, nosys = 0x7FFF0000, 0x00050000 | EPERM, 0x00050000 | ENOSYS

    def op(code, k, jt=0, jf=0):
        return struct.pack("HBBI", code, jt, jf, k)

    program = [
        op(ld, 4),  # 0: the architecture
        op(jeq, arch, 0, 10),  # 1: another ABI -> 12 (ENOSYS)
        op(ld, 0),  # 2: the syscall number
        op(jge, 0x40000000, 8, 0),  # 3: x32 -> 12 (ENOSYS)
        op(jeq, nr["clone3"], 7, 0),  # 4: -> 12 (ENOSYS)
        op(jeq, nr["setns"], 5, 0),  # 5: -> 11 (EPERM)
        op(jeq, nr["unshare"], 1, 0),  # 6: -> 8 (look at the flags)
        op(jeq, nr["clone"], 0, 2),  # 7: -> 8, else -> 10 (allow)
        op(ld, 16),  # 8: the low 32 bits of the first argument: the flags
        op(jset, CLONE_NEWUSER, 1, 0),  # 9: -> 11 (EPERM)
        op(ret, allow),  # 10
        op(ret, deny),  # 11
        op(ret, nosys),  # 12
    ]
    return b"".join(program)


def block_user_namespaces():
    """Install :func:`userns_filter` on this process and all it forks; "" or why it failed."""
    program = userns_filter()
    if program is None:
        return f"no filter for the {platform.machine()} architecture"

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buffer = ctypes.create_string_buffer(program, len(program))
        fprog = SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
        # Without privileges a filter needs no_new_privs; bwrap sets it anyway.
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}"
        if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
            return f"prctl(PR_SET_SECCOMP) failed: {os.strerror(ctypes.get_errno())}"
    except (OSError, AttributeError) as exc:
        return f"seccomp unavailable: {exc}"
    return ""


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


def wait_for_solution(pid, value_r, deadline, memory_budget):
    """(wait status, or None at the deadline or over the memory budget; the value's bytes;
    whether the value was too large; whether the processes held more than ``memory_budget``)."""
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
            return status, b"".join(chunks), too_large, False
        if too_large:
            try:
                os.kill(pid, signal.SIGKILL)
            except PermissionError:  # another uid (bwrap as root): our exit ends the namespace
                return None, b"", True, False
            return os.waitpid(pid, 0)[1], b"", True, False
        if memory_budget is not None and resident_bytes(descendants()) > memory_budget:
            kill_all(descendants())
            return None, b"", False, True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, b"", False, False
        watch = ([] if eof or too_large else [value_r]) + ([] if pidfd is None else [pidfd])
        timeout = remaining if pidfd is not None else min(remaining, 0.02)
        if memory_budget is not None:
            timeout = min(timeout, MEMORY_POLL_S)
        if watch:
            select.select(watch, [], [], timeout)
        else:
            time.sleep(timeout)
        drain()


def descendants():
    """Pids of every process below this one: the solution, its children and their orphans.

    Orphans come back to this process (the namespace's init under bwrap, a child
    subreaper otherwise), so nothing the solution starts falls outside the sum.
    """
    found, todo = [], [os.getpid()]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children", "rb") as file:
                    kids = [int(k) for k in file.read().split()]
            except OSError:
                if parent == os.getpid():  # no children files in this kernel: scan /proc
                    return all_below(os.getpid())
                continue
            found += kids
            todo += kids
    return found


def all_below(root):
    """Pids below ``root``, from every process's parent in /proc (the slow way)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [root]
    while todo:
        parent = todo.pop()
        kids = [pid for pid, ppid in parents.items() if ppid == parent]
        found += kids
        todo += kids
    return found


def resident_bytes(pids):
    """Resident memory of ``pids`` together (pages shared after a fork count once per process)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as statm:
                total += int(statm.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone, or another uid (bwrap as root): our exit ends the namespace
            pass


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
    userns_error = block_user_namespaces()
    value_r, value_w = os.pipe()
    deadline = time.monotonic() + cfg["wall_s"]
    pid = os.fork()
    if pid == 0:
        os.close(report_fd)
        os.close(value_r)
        solution_main(cfg, value_w)
    os.close(value_w)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a solution's SIGINT must not end the report
    budget = cfg["total_memory_mb"] * 1024 * 1024 if cfg["total_memory_mb"] else None
    status, value, too_large, over_memory = wait_for_solution(pid, value_r, deadline, budget)
    if status is None:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if cfg["reap"]:
        kill_descendants()
    report = {
        "timed_out": status is None and not too_large and not over_memory,
        "memory_exceeded": over_memory,
        "userns_filter_error": userns_error,
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
