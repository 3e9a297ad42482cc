"""Run untrusted Python in its own process tree, inside bubblewrap when it can run.

An RL policy samples hostile code as a matter of course, so a solution is treated
as an attacker that wants to end the training run, reach the network, read or
write the trainer's files, fork without bound, or leave processes behind.

Process layout (both sandboxes)::

    trainer ──(own session)── [bwrap] ── supervisor ── solution ── its children

The *supervisor* is trusted code (``tasks/sandbox_supervisor.py``) started in its own
session. It forks the *solution* process, which closes the report pipe, drops
privileges, applies the resource limits and only then runs the user's code. The
supervisor waits for the solution (up to the wall-time limit), kills what is
left, and writes a JSON report to a pipe that only it holds. The trainer sees
neither the solution's exit nor its signals, only the supervisor's report, and
always kills the whole process group when the run ends.

With ``bwrap`` (:func:`bwrap_problem` probes once per process whether it runs):

* PID namespace (``--unshare-pid --as-pid-1``): the supervisor is the namespace's
  init, which the kernel shields from its descendants' signals (SIGKILL
  included); the trainer's pid does not exist there, ``os.getppid()`` is 1 and
  ``kill(-1)`` stops at the namespace. When the supervisor exits, the kernel
  kills every process left in the namespace, so nothing outlives a test.
  ``--die-with-parent`` kills the sandbox when the trainer dies.
* Network namespace (``--unshare-net``) with only its own loopback: nothing
  outside is reachable whatever the code imports (``_socket``, a reloaded
  ``socket``, ctypes).
* Filesystem: an empty read-only root (``--remount-ro /``) holding ``/usr`` and
  the ``/lib*``, ``/bin`` links, ``/etc/ld.so.cache`` (the one file of /etc the
  dynamic loader reads; Python needs nothing else there), the Python
  installation and virtual environment, all read-only; a fresh ``/proc`` of the
  namespace, a minimal ``/dev`` with a 64 MiB ``/dev/shm``; and one writable
  directory, ``/sandbox/work`` (cwd, HOME, TMPDIR), a tmpfs of ``Limits.disk_mb``
  (64 MiB) holding the program read-only: disk is capped per solution, all files
  together. No other host file is visible: no ``/etc/passwd``, no home directory,
  no checkpoint, no dataset.
* IPC and UTS namespaces (``--unshare-ipc --unshare-uts``), a new session
  (``--new-session``: no terminal injection), an empty environment
  (``--clearenv``) and ``no_new_privs`` (setuid binaries under /usr gain nothing).
* Users. As root, bwrap runs privileged (no user namespace): the supervisor
  keeps only CAP_SETUID and CAP_SETGID (``--cap-drop ALL --cap-add``), and the solution switches
  to a random unprivileged uid (2e9 + up to 1e8, not in /etc/passwd) with no
  capabilities, so it cannot signal or trace the supervisor and RLIMIT_NPROC
  counts only its own processes. ``--unshare-user --uid 65534`` is *not* used as
  root: the kernel sees that uid as root outside the namespace and never
  enforces RLIMIT_NPROC for root. As any other user, bwrap makes a user
  namespace (``--unshare-user --disable-userns``); the solution keeps the
  trainer's uid, and RLIMIT_NPROC counts per user namespace, i.e. per sandbox.
* Limits on the solution process and its children: CPU time, address space,
  file size (which also caps stdout and stderr: they are files), no core dumps,
  and a process count (threads included).

In both sandboxes the supervisor, before it forks the solution, installs a seccomp
filter that refuses new user namespaces (``unshare``/``clone`` with CLONE_NEWUSER,
``setns``; ``clone3`` and foreign ABIs get ENOSYS) on x86_64 and aarch64: as root,
bwrap makes no user namespace, so ``--disable-userns`` cannot apply. Where the filter
cannot be installed, a WARNING is logged once per process. And it sums the resident
memory of every process below it every 50 ms (the solution, its children, their
orphans, which come back to it) and kills them all past ``Limits.total_memory_mb``
(default: ``memory_mb``), since RLIMIT_AS caps each process alone. cgroups would be
exact, but are not used: they are rarely delegated to a trainer (on the machine this
was written on, a cgroup v1 hierarchy owned by the machine's launcher).

Result channel: the supervisor gets the write end of a pipe (``report_fd``) that
the solution process closes right after the fork, before any user code runs.
The supervisor is non-dumpable (PR_SET_DUMPABLE 0), so a solution of the same
uid can neither open ``/proc/<supervisor>/fd/N`` nor ptrace it; printing on
stdout cannot change the report. A function's return value travels from the
solution to the supervisor as JSON over a second pipe: the solution can write
there what it likes, but that is what it could return anyway, and the expected
outputs never enter the sandbox. The harness parses the report defensively and
never raises on what it holds.

Without bwrap (``sandbox="none"``, or ``"auto"`` where bwrap cannot run; a
WARNING is logged once per process) the supervisor, the report channel and the
CPU, memory, file-size and wall-time limits stay; the supervisor is a child
subreaper that kills all its descendants when the solution ends. What the
fallback does NOT protect against, because the solution runs as the trainer's
user in the trainer's namespaces:

* the network: the Python-level socket patch is bypassed by ``import _socket``;
* files: it reads and writes everything the trainer can;
* signals: killing its supervisor only fails its test, but it can signal any
  process of the trainer's user, ``os.kill(<trainer pid>, 9)`` and, worst,
  ``os.kill(-1, 9)``, which as root ends every process on the machine;
* fork bombs: RLIMIT_NPROC would count the trainer's own processes and is not
  enforced for root, so none is set;
* leftovers: a solution that kills its supervisor and calls ``setsid()``
  escapes both the subreaper and the harness's process-group kill.

Still weaker than it should be, even with bwrap: the seccomp filter refuses user
namespaces only (the rest of the syscall surface is reachable); the memory sum is
sampled, so a peak shorter than 50 ms can pass it (each process stays under
RLIMIT_AS), and it counts pages shared after a fork once per process (strict, not
exact); the tmpfs work directory and ``/dev/shm`` (64 + 64 MiB) are memory that no
process's resident count shows. Without bwrap the work directory is on the trainer's
disk, capped per file only.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

#: Accepted values of a task's ``sandbox`` setting.
SANDBOX_CHOICES = ("auto", "bwrap", "none")
#: Where the work directory and the bootstrap appear inside bwrap.
_SANDBOX_DIR = "/sandbox"
#: Uids given to solutions when the trainer runs as root: 2e9 + [0, 1e8).
_SANDBOX_UID_BASE, _SANDBOX_UID_SPAN = 2_000_000_000, 100_000_000
#: Size of the sandbox's /dev/shm (multiprocessing's semaphores live there), in MiB.
_SHM_MB = 64
#: Extra seconds the harness waits past the wall-time limit for the supervisor's report.
_REPORT_GRACE_S = 5.0
#: Top-level system paths that are links into /usr on merged-/usr systems, directories elsewhere.
_SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

#: The supervisor and the solution runner, run as a script with the sandbox's python
#: under -I (stdlib only); its config comes as JSON in argv[1] (nothing in it is secret).
_SUPERVISOR = Path(__file__).with_name("sandbox_supervisor.py")


class SandboxUnavailable(RuntimeError):
    """``sandbox="bwrap"`` was asked for but bubblewrap cannot run on this machine."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run."""

    #: CPU seconds of the solution process (SIGXCPU, then SIGKILL one second later).
    cpu_s: int = 4
    #: Wall-clock seconds from the fork of the solution until it is killed.
    wall_s: float = 10.0
    #: Address-space limit of each solution process, in MiB.
    memory_mb: int = 512
    #: Processes and threads the solution may have at once (bwrap only; see module doc).
    max_processes: int = 32
    #: Largest file the solution may write, stdout and stderr included, in MiB.
    output_mb: int = 16
    #: Resident memory of all the solution's processes together, in MiB (None: ``memory_mb``).
    total_memory_mb: int | None = None
    #: Size of the work directory (cwd, HOME, TMPDIR), all files together, in MiB (bwrap only).
    disk_mb: int = 64


@dataclass(frozen=True)
class SandboxRun:
    """How one sandboxed run ended, as the supervisor reported it."""

    #: The sandbox that ran the code: ``"bwrap"`` or ``"none"``.
    sandbox: str
    stdout: str
    stderr: str
    #: The solution's exit status, or None when a signal ended it or it never finished.
    exit_code: int | None = None
    #: The signal that ended the solution, if one did.
    signal: int | None = None
    #: The called function's return value as JSON text (function calls only).
    value: str | None = None
    #: Why the run has no outcome ("" when the solution ran to its end): wall time, a dead supervisor.
    failure: str = ""
    #: Why the supervisor dropped the return value, if it did.
    value_error: str = ""


_warned_fallback = False


@functools.cache
def bwrap_problem() -> str | None:
    """Why bubblewrap cannot sandbox code here, or None when it can (probed once per process)."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    probe = run_python("print(6 * 7)", stdin="", limits=Limits(wall_s=30.0), sandbox="bwrap")
    with ThreadPoolExecutor(1) as pool:  # works whether or not the caller runs an event loop
        run = pool.submit(asyncio.run, probe).result()
    if run.exit_code == 0 and run.stdout.strip() == "42":
        return None
    tail = run.stderr.strip().splitlines()[-1:]
    detail = run.failure or f"exit status {run.exit_code}, signal {run.signal}"
    return f"a trial run failed: {tail[0] if tail else detail}"


def resolve_sandbox(requested: str) -> str:
    """The sandbox to use for ``requested`` (``auto``, ``bwrap`` or ``none``): ``bwrap`` or ``none``.

    Raises:
        ValueError: ``requested`` is not one of :data:`SANDBOX_CHOICES`.
        SandboxUnavailable: ``bwrap`` was requested and cannot run here.
    """
    global _warned_fallback
    if requested not in SANDBOX_CHOICES:
        raise ValueError(
            f"unknown sandbox {requested!r}; expected one of {', '.join(SANDBOX_CHOICES)}"
        )
    problem = None if requested == "none" else bwrap_problem()
    if requested == "bwrap" and problem is not None:
        raise SandboxUnavailable(f"sandbox='bwrap' but bubblewrap cannot run here: {problem}")
    if requested != "none" and problem is None:
        return "bwrap"
    if not _warned_fallback:
        _warned_fallback = True
        why = "sandbox='none'" if requested == "none" else f"bubblewrap cannot run ({problem})"
        logger.warning(
            "code sandbox: %s; solutions run without OS isolation: they can reach the network, "
            "read and write the trainer's files and signal its processes, with no process-count "
            "limit and no disk limit beyond the size of each file. Install bubblewrap for "
            "untrusted code (see tasks/sandbox.py).",
            why,
        )
    return "none"


async def run_python(
    code: str,
    *,
    stdin: str,
    limits: Limits,
    sandbox: str,
    func_name: str | None = None,
) -> SandboxRun:
    """Run ``code`` as a script (or call its ``func_name`` with the JSON list on ``stdin``).

    ``sandbox`` is ``"bwrap"`` or ``"none"`` (see :func:`resolve_sandbox`). Never
    raises for anything the code does; the outcome is in the returned record.
    """
    if sandbox not in ("bwrap", "none"):
        raise ValueError(f"unknown sandbox {sandbox!r}; expected bwrap or none")
    # Cleanup errors are ignored: a solution's leftovers must not fail the scoring call.
    with tempfile.TemporaryDirectory(prefix="aipo-code-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        work = root / "work"
        work.mkdir()
        (work / "solution.py").write_text(code, encoding="utf-8")
        (work / "solution.py").chmod(0o644)
        (root / "bootstrap.py").write_text(_SUPERVISOR.read_text(encoding="utf-8"))
        (root / "stdin").write_text(stdin, encoding="utf-8")
        report_r, report_w = os.pipe()
        report = os.fdopen(report_r, "rb", buffering=0)
        config = {
            "report_fd": report_w,
            "solution": "solution.py",
            "func_name": func_name,
            "uid": None,
            "cpu_s": limits.cpu_s,
            "wall_s": limits.wall_s,
            "memory_mb": limits.memory_mb,
            "output_mb": limits.output_mb,
            "max_processes": limits.max_processes if sandbox == "bwrap" else None,
            "total_memory_mb": limits.total_memory_mb or limits.memory_mb,
            "reap": sandbox == "none",
        }
        if sandbox == "bwrap":
            if os.geteuid() == 0:
                config["uid"] = _SANDBOX_UID_BASE + secrets.randbelow(_SANDBOX_UID_SPAN)
                for path in (work, work / "solution.py"):
                    os.chown(path, config["uid"], config["uid"])
            argv = _bwrap_argv(root, work, json.dumps(config), limits.disk_mb)
            cwd = root
        else:
            argv = [sys.executable, "-I", str(root / "bootstrap.py"), json.dumps(config)]
            cwd = work
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "HOME": str(work)}
        try:
            with (
                open(root / "stdin", "rb") as stdin_file,
                open(root / "stdout", "wb") as stdout_file,
                open(root / "stderr", "wb") as stderr_file,
            ):
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=stdin_file,
                    stdout=stdout_file,
                    stderr=stderr_file,
                    cwd=cwd,
                    env=env,
                    pass_fds=(report_w,),
                    start_new_session=True,
                )
        except BaseException:
            report.close()
            raise
        finally:
            os.close(report_w)
        report_bytes, timed_out = b"", False
        try:
            report_bytes, _ = await asyncio.wait_for(
                asyncio.gather(_read_until_eof(report), proc.wait()),
                limits.wall_s + _REPORT_GRACE_S,
            )
        except asyncio.TimeoutError:
            timed_out = True
        finally:
            report.close()
            _kill_group(proc.pid)
            await proc.wait()
        cap = limits.output_mb * 1024 * 1024
        stdout = _read_capped(root / "stdout", cap)
        stderr = _read_capped(root / "stderr", cap)
    return _outcome(sandbox, report_bytes, stdout, stderr, proc.returncode, timed_out, limits)


def _outcome(
    sandbox: str,
    report_bytes: bytes,
    stdout: str,
    stderr: str,
    returncode: int | None,
    timed_out: bool,
    limits: Limits,
) -> SandboxRun:
    """The run as the supervisor's report describes it (parsed defensively)."""
    try:
        report = json.loads(report_bytes)
    except ValueError:
        report = None
    if timed_out and not isinstance(report, dict):
        report = {"timed_out": True}  # the supervisor itself hung; the harness killed it
    if not isinstance(report, dict):
        return SandboxRun(
            sandbox,
            stdout,
            stderr,
            failure=f"the sandbox's supervisor died without a report (exit status {returncode})",
        )
    _warn_userns_filter(report.get("userns_filter_error"))
    if report.get("timed_out"):
        return SandboxRun(
            sandbox, stdout, stderr, failure=f"wall-time limit of {limits.wall_s:g} s exceeded"
        )
    if report.get("memory_exceeded"):
        total = limits.total_memory_mb or limits.memory_mb
        return SandboxRun(
            sandbox,
            stdout,
            stderr,
            failure=f"memory limit of {total} MiB for all the solution's processes exceeded",
        )
    return SandboxRun(
        sandbox,
        stdout,
        stderr,
        exit_code=report.get("exit_code"),
        signal=report.get("signal"),
        value=report.get("value"),
        value_error=str(report.get("value_error") or ""),
    )


_warned_userns_filter = False


def _warn_userns_filter(error: object) -> None:
    """Log once per process that the supervisor could not refuse new user namespaces."""
    global _warned_userns_filter
    if error and not _warned_userns_filter:
        _warned_userns_filter = True
        logger.warning(
            "code sandbox: no seccomp filter (%s): solutions can create user namespaces", error
        )


def userns_filter_problem() -> str | None:
    """Why the supervisor has no filter against user namespaces here, or None when it has one."""
    if platform.machine() not in ("x86_64", "aarch64") or sys.byteorder != "little":
        return f"no filter for the {platform.machine()} architecture"
    return None


async def _read_until_eof(pipe: BinaryIO) -> bytes:
    """Everything written to ``pipe`` until its last writer closes it."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        return await reader.read()
    finally:
        transport.close()


def _read_capped(path: Path, cap: int) -> str:
    with open(path, "rb") as file:
        return file.read(cap).decode(errors="replace")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _bwrap_argv(root: Path, work: Path, config: str, disk_mb: int) -> list[str]:
    """The bwrap command line that runs the bootstrap with ``config`` (see module doc)."""
    argv = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session"]
    # --as-pid-1: the supervisor is the namespace's init, immune to the solution's signals,
    # and bwrap reaps it itself (bwrap's own init would be left to the host's init to reap).
    argv += ["--unshare-pid", "--as-pid-1", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
    argv += ["--unshare-cgroup-try"]
    if os.geteuid() == 0:
        # Privileged bwrap keeps every capability of root unless told otherwise; the
        # supervisor needs only to switch the solution to its uid.
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--disable-userns"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for top in _SYSTEM_LINKS:
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += ["--perms", "0755", "--dir", "/etc"]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    roots = _python_roots()
    # Parents made explicitly: bwrap would copy their host modes (/root is 0700).
    made: set[str] = set()
    for path in roots:
        for parent in reversed(Path(path).parents[:-1]):
            if str(parent) not in made:
                made.add(str(parent))
                argv += ["--perms", "0755", "--dir", str(parent)]
    for path in roots:
        argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--perms", "1777", "--size", str(_SHM_MB * 1024 * 1024), "--tmpfs", "/dev/shm"]
    argv += ["--perms", "0755", "--dir", _SANDBOX_DIR]
    inside = f"{_SANDBOX_DIR}/work"
    argv += ["--ro-bind", str(root / "bootstrap.py"), f"{_SANDBOX_DIR}/bootstrap.py"]
    # The work directory is a tmpfs of its own size: disk is capped per solution, not
    # only per file; the program is bound into it read-only.
    argv += ["--perms", "1777", "--size", str(disk_mb * 1024 * 1024), "--tmpfs", inside]
    argv += ["--ro-bind", str(work / "solution.py"), f"{inside}/solution.py"]
    argv += ["--remount-ro", "/", "--chdir", inside]
    argv += ["--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "PYTHONHASHSEED", "0"]
    argv += ["--setenv", "HOME", inside, "--setenv", "TMPDIR", inside]
    return [*argv, "--", sys.executable, "-I", f"{_SANDBOX_DIR}/bootstrap.py", config]


def _python_roots() -> list[str]:
    """The Python installation and virtual environment, outside the system paths bound anyway."""
    system = ("/usr", *_SYSTEM_LINKS)
    candidates = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    candidates |= {os.path.realpath(path) for path in candidates}
    roots: list[str] = []
    for path in sorted(candidates, key=len):
        inside = [*system, *roots]
        if path != "/" and not any(path == r or path.startswith(r + "/") for r in inside):
            roots.append(path)
    return sorted(roots)
