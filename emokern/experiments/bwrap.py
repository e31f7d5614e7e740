"""The kernel-isolation layer of :mod:`emokern.experiments.sandbox`: bubblewrap's options and the seccomp filter.

Linux only. Under ``sandbox="bwrap"`` (the default), :func:`~emokern.experiments.sandbox.run_in_sandbox` runs its
child under bubblewrap (``bwrap``; Debian's ``bubblewrap`` package) with the options built here, and the Python guard
of :mod:`emokern.experiments.sandbox` is a second wall inside it. When bwrap is not on ``PATH`` or cannot create its
namespaces, :class:`SandboxUnavailable` (defined here, re-exported by :mod:`emokern.experiments.sandbox`) says what to
install or which option accepts the weaker guard. :func:`sandbox_info` describes what a level isolates.

**The bwrap level** (the arguments are built in :func:`bwrap_arguments`, the host command in :func:`launch_command`):

* who: never the host's root. Run as root, the launcher enters a private mount namespace of its own, bind-mounts
  the Python installation read-only onto a small staging tmpfs there (a Python under ``/root`` is out of reach of
  other users) and drops to :data:`SANDBOX_UID`/:data:`SANDBOX_GID` (65534, ``nobody``) with ``setpriv`` (no
  supplementary groups, no capabilities) before it starts bwrap, which then makes an unprivileged user namespace
  whose every id is 65534 on the host: the global knobs that no capability drop protects (sysctls, core_pattern)
  are another user's. Run as a user, the sandbox is that user's. bwrap started by root would map the sandbox's uid 0
  to the host's root.
* namespaces: ``--unshare-all --unshare-user`` (new user, mount, PID, network, IPC, UTS and, where the kernel has
  one, cgroup namespaces; the user namespace is required, not merely tried), ``--disable-userns`` (no nested user
  namespaces) and ``--hostname sandbox``. The new network namespace holds only its own loopback interface: no
  network at all, and 127.0.0.1 is the sandbox's own, not the host's.
* privileges: ``--cap-drop ALL`` (run as root, bwrap would otherwise keep every capability inside the user
  namespace), and ``no_new_privs``, which bwrap always sets.
* filesystem: an empty root (bwrap's tmpfs, remounted read-only once set up) with read-only binds of only what the
  interpreter needs: the base interpreter (the real file behind a virtual environment's ``python``: the code runs
  ``-I -S``, so neither the environment nor any site-packages is needed), its standard library (with
  ``lib-dynload``), ``libpython`` when it is shared, the shared-library directories (``/usr/lib``, ``/usr/lib64``,
  ``/lib``, ``/lib64`` ..., or the same symlinks where they are links) and ``/etc/ld.so.cache``. Not the home
  directory, the project checkout, the model caches or the rest of ``/etc``. No ``/proc`` and no ``/sys`` (the
  interpreter needs neither; a procfs holds ``/proc/sys`` and ``/proc/self/mem``), and bwrap's minimal ``/dev``
  (``null``, ``zero``, ``full``, ``random``, ``urandom``, ``tty``), remounted read-only.
* working directory: a fresh tmpfs at :data:`WORKDIR` (``/sandbox``) of ``workdir_mb`` MiB (writing beyond it fails
  with ``ENOSPC``), mode 0700, holding the given files (copied in from memfds with ``--file``). It is the cwd,
  ``HOME`` and ``TMPDIR``, and it vanishes with the namespace: nothing the code writes reaches the host's disk.
* processes: ``--as-pid-1``: the interpreter is the PID namespace's process 1, with no bwrap process beside it
  (bwrap's usual reaper at PID 1 would be a process of the same user whose memory the code could read and write,
  free of the rlimits); its parent is outside the namespace (``getppid()`` is 0). ``--die-with-parent`` and
  ``--new-session`` (no controlling terminal to push input into). ``--info-fd`` tells the host the interpreter's host
  pid, on which it opens a pidfd at once: at the end of the run (timeout or not) the host kills it through the pidfd,
  and the kernel then kills every other process of the namespace, whatever it did to its parent-death signal,
  session or group.
* seccomp (``--seccomp FD``; :func:`seccomp_filter`, x86-64 and aarch64): refuses with ``EPERM`` the system calls
  that the namespaces do not isolate: creating processes and threads (``fork``, ``vfork``, ``clone``, ``clone3``),
  reaching into other processes (``ptrace``, ``process_vm_readv``/``writev``, ``kcmp``, ``pidfd_getfd``,
  ``process_madvise``), new namespaces and mounts (``unshare``, ``setns``, ``mount`` and the new mount API,
  ``umount2``, ``pivot_root``, ``chroot``), the kernel keyrings, ``bpf``, ``perf_event_open``, ``userfaultfd``,
  ``io_uring`` (whose operations seccomp does not see), ``personality``, ``syslog``, and memory that ``RLIMIT_AS``
  does not count (``memfd_create``, ``memfd_secret``, System V ``shmget``/``shmat``/``msgget``/``semget``,
  ``mq_open``). ``socket`` and ``socketpair`` make ``AF_UNIX`` sockets only; any other family (``AF_INET``,
  ``AF_VSOCK``, which reaches the hypervisor of a VM host, ``AF_NETLINK``, ``AF_PACKET``, ...) gets
  ``EAFNOSUPPORT``. A system call of another ABI (32-bit x86, x32) kills the process. On other architectures the
  level runs without the filter, and :func:`sandbox_info` records that.
* environment: only ``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` and ``PWD`` (which bwrap sets with ``--chdir``); of
  the host's file descriptors only the three standard streams, the guard's report pipe (and the pipe of its key,
  read and closed before any untrusted line runs), and where two programs are connected, their channel.
* memory: bounded per process by ``RLIMIT_AS``, and there is one process (no fork, no threads), its tmpfs
  (``workdir_mb``) and its pipes; memory outside the address space is refused by seccomp (above). No cgroup is used:
  the bound holds without one, and many machines (this project's among them) keep the memory controller in cgroup v1.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["GUARD_WARNING", "INSTALL_HINT", "SANDBOXES", "SANDBOX_GID", "SANDBOX_UID", "USERNS_HINT", "UTIL_LINUX_HINT",
           "WEAKER_HINT", "WORKDIR", "SandboxUnavailable", "base_install_path", "base_interpreter", "bwrap_arguments",
           "check_sandbox_name", "find_bwrap", "launch_command", "runs_as_root", "sandbox_info", "seccomp_filter"]

SANDBOXES = ("bwrap", "python-guard")  # the isolation levels, strongest first
WORKDIR = "/sandbox"  # the working directory inside bwrap's mount namespace

# The tails of SandboxUnavailable's messages (what to do about it) and the python-guard warning's text.
WEAKER_HINT = ("or accept a guard that is not a security boundary with sandbox='python-guard' (on the command line: "
               "--sandbox python-guard)")
INSTALL_HINT = ("install bubblewrap so that bwrap is on PATH (Debian/Ubuntu: apt-get install bubblewrap; Fedora: "
                "dnf install bubblewrap), " + WEAKER_HINT)
USERNS_HINT = ("bwrap needs user namespaces: allow them (sysctl user.max_user_namespaces > 0; older Debian kernels: "
               "kernel.unprivileged_userns_clone=1; Ubuntu 24.04: kernel.apparmor_restrict_unprivileged_userns=0; in a "
               "container: a seccomp profile that permits unshare(CLONE_NEWUSER)), " + WEAKER_HINT)
GUARD_WARNING = ("sandbox='python-guard' runs the code with an audit hook and rlimits only: not a security boundary "
                 "(code written to defeat the hook can read and write the host's files and reach the network); use "
                 "sandbox='bwrap' for code from a capable model")


class SandboxUnavailable(RuntimeError):
    """The isolation asked for cannot be had here: bwrap is missing or cannot create its namespaces, the interpreter
    does not start inside it, or the probe of :func:`~emokern.experiments.sandbox.check_isolation` got through. The
    message says what to install or which option accepts the weaker guard; nothing falls back by itself."""


# ----------------------------------------------------------------------------------------------------------------------
# seccomp
# ----------------------------------------------------------------------------------------------------------------------

# The system calls the filter refuses (see the module docstring for why these): name -> (x86-64 number, aarch64
# number, or None where the architecture has no such call), from the kernel's asm/unistd_64.h (x86-64) and
# asm-generic/unistd.h (aarch64). tests/test_sandbox.py checks both columns against libseccomp where it is installed.
_DENIED_SYSCALLS: Dict[str, Tuple[int, Optional[int]]] = {
    "fork": (57, None), "vfork": (58, None), "clone": (56, 220), "clone3": (435, 435),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "kcmp": (312, 272),
    "pidfd_getfd": (438, 438), "process_madvise": (440, 440),
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "personality": (135, 92),
    # memory that RLIMIT_AS does not count (an unmapped memfd, a detached System V segment, a message queue)
    "memfd_create": (319, 279), "memfd_secret": (447, 447), "shmget": (29, 194), "shmat": (30, 196),
    "msgget": (68, 186), "semget": (64, 190), "mq_open": (240, 180),
    # the kernel's log (an information leak where dmesg_restrict is off)
    "syslog": (103, 116),
}
# socket() and socketpair() are allowed for AF_UNIX only (the network namespace does not cover every family: AF_VSOCK
# reaches the hypervisor, AF_NETLINK and AF_PACKET the kernel); every other family gets EAFNOSUPPORT.
_SOCKET_SYSCALLS: Dict[str, Tuple[int, int]] = {"socket": (41, 198), "socketpair": (53, 199)}
_AF_UNIX = 1
_EAFNOSUPPORT = 97
# architecture -> (AUDIT_ARCH_* value seccomp reports, column of _DENIED_SYSCALLS)
_SECCOMP_ARCHES = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}
_X32_SYSCALL_BIT = 0x40000000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x06
_SECCOMP_RET_KILL_PROCESS, _SECCOMP_RET_ERRNO, _SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_EPERM = 1
# offsets in struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64), args[6] (u64 each); the low half
# of args[0] on a little-endian machine (both architectures of the table are)
_DATA_NR, _DATA_ARCH, _DATA_ARG0_LOW = 0, 4, 16


def _seccomp_arch() -> Optional[str]:
    """The architecture the filter is built for, or None where there is no table (or a 32-bit interpreter)."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    return machine if machine in _SECCOMP_ARCHES and struct.calcsize("P") == 8 else None


def seccomp_filter() -> Optional[bytes]:
    """The seccomp program ``bwrap --seccomp`` loads: classic BPF (``struct sock_filter[]`` in this machine's byte
    order) that kills a system call of another ABI, refuses those of ``_DENIED_SYSCALLS`` with ``EPERM``, lets
    ``socket``/``socketpair`` create ``AF_UNIX`` sockets only (any other family: ``EAFNOSUPPORT``) and allows the
    rest. None on an architecture without a table here (see :func:`sandbox_info`)."""
    arch = _seccomp_arch()
    if arch is None:
        return None
    audit_arch, column = _SECCOMP_ARCHES[arch]
    denied = sorted({row[column] for row in _DENIED_SYSCALLS.values() if row[column] is not None})
    sockets = sorted(row[column] for row in _SOCKET_SYSCALLS.values())
    # (code, true target, false target, k): a target is a label, resolved to a relative jump below
    program: List[Tuple[int, object, object, int]] = [
        (_BPF_LD_W_ABS, None, None, _DATA_ARCH),
        (_BPF_JEQ_K, "next", "kill", audit_arch),
        (_BPF_LD_W_ABS, None, None, _DATA_NR)]
    if arch == "x86_64":
        # the x32 ABI shares AUDIT_ARCH_X86_64, with this bit set in the number: refuse all of it
        program.append((_BPF_JGE_K, "deny", "next", _X32_SYSCALL_BIT))
    program += [(_BPF_JEQ_K, "family", "next", nr) for nr in sockets]
    program += [(_BPF_JEQ_K, "deny", "next", nr) for nr in denied]
    program += [(_BPF_RET_K, None, None, _SECCOMP_RET_ALLOW),
                ("family", _BPF_LD_W_ABS, None, None, _DATA_ARG0_LOW),
                (_BPF_JEQ_K, "allow", "no_family", _AF_UNIX),
                ("allow", _BPF_RET_K, None, None, _SECCOMP_RET_ALLOW),
                ("no_family", _BPF_RET_K, None, None, _SECCOMP_RET_ERRNO | _EAFNOSUPPORT),
                ("deny", _BPF_RET_K, None, None, _SECCOMP_RET_ERRNO | _EPERM),
                ("kill", _BPF_RET_K, None, None, _SECCOMP_RET_KILL_PROCESS)]
    labels = {}
    rows = []
    for i, row in enumerate(program):
        if isinstance(row[0], str):
            labels[row[0]] = i
            row = row[1:]
        rows.append(row)

    def jump(target, at: int) -> int:
        if target is None or target == "next":
            return 0
        offset = labels[target] - at - 1
        assert 0 <= offset < 256, (target, offset)  # classic BPF jumps forward by at most 255
        return offset

    return b"".join(struct.pack("=HBBI", code, jump(jt, i), jump(jf, i), k) for i, (code, jt, jf, k) in enumerate(rows))


# ----------------------------------------------------------------------------------------------------------------------
# What the child needs
# ----------------------------------------------------------------------------------------------------------------------

# Shared-library directories, bound read-only (or re-created as the same symlink where the host has a link).
_SYSTEM_LIBRARY_DIRS = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32", "/lib", "/lib64", "/lib32", "/libx32")


@functools.lru_cache(maxsize=None)
def base_interpreter() -> str:
    """The base interpreter's real path: the file a virtual environment's ``python`` links to (or names in its
    ``pyvenv.cfg``). The child runs ``-I -S`` and needs only the standard library, so nothing of the environment,
    which may live inside the project checkout, is used or mounted."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def base_install_path(name: str) -> str:
    """A ``sysconfig`` path (``"stdlib"``, ``"platstdlib"``) of the base installation, also from a venv."""
    return sysconfig.get_path(name, vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
                                          "installed_base": sys.base_prefix,
                                          "installed_platbase": sys.base_exec_prefix})


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


@functools.lru_cache(maxsize=None)
def _python_paths() -> Tuple[str, ...]:
    """The host paths of the Python installation that bwrap binds read-only at the same place: the interpreter, its
    standard library and ``lib-dynload`` (of the base installation, not of a virtual environment), and ``libpython``
    when the interpreter links it as a shared library; real paths, less those inside another or inside a
    shared-library directory."""
    paths = [base_interpreter(), base_install_path("stdlib"), base_install_path("platstdlib")]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
        if libdir and soname:
            paths.append(os.path.join(libdir, soname))
    real = sorted({os.path.realpath(p) for p in paths if p and os.path.exists(p)})
    libraries = [os.path.realpath(d) for d in _SYSTEM_LIBRARY_DIRS if os.path.isdir(d)]
    return tuple(p for p in real if not _under(p, libraries) and not any(q != p and _under(p, [q]) for q in real))


def find_bwrap() -> str:
    """The bwrap executable on ``PATH``, or :class:`SandboxUnavailable` saying what to install."""
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable(f"sandbox='bwrap': bubblewrap is not installed (no bwrap on PATH); {INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=None)
def _bwrap_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or out.stderr.strip()


def bwrap_arguments(files: Sequence[Tuple[int, str]], seccomp_fd: Optional[int], workdir_mb: float,
                     info_fd: Optional[int] = None, sources: Optional[Dict[str, str]] = None) -> List[str]:
    """bwrap's options (everything before ``--``): ``files`` are ``(readable fd, relative name)`` copied into the
    working directory; ``seccomp_fd`` reads the program of :func:`seccomp_filter`, None for no filter;
    ``info_fd`` receives bwrap's JSON ``{"child-pid": ...}`` (the sandbox's PID 1 as the host numbers it);
    ``sources`` maps a path of :func:`_python_paths` to where bwrap finds it (the staged copy of
    :func:`launch_command` when run as root), by default the path itself."""
    sources = sources or {}
    args = ["--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL", "--as-pid-1",
            "--die-with-parent", "--new-session", "--hostname", "sandbox"]
    for path in _SYSTEM_LIBRARY_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in _python_paths():
        args += ["--ro-bind", sources.get(path, path), path]
    # the loader's cache of library locations (a file of paths), for a libpython outside the default directories
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    # No /proc: the interpreter does not need it, and a procfs holds the kernel's writable knobs (/proc/sys) and the
    # process's own memory (/proc/self/mem), which an audit-hook bypass would use first.
    args += ["--dev", "/dev", "--remount-ro", "/dev"]
    args += ["--perms", "0700", "--size", str(int(workdir_mb * (1 << 20))), "--tmpfs", WORKDIR]
    for fd, name in files:
        args += ["--file", str(fd), f"{WORKDIR}/{name}"]
    args += ["--remount-ro", "/", "--chdir", WORKDIR]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    if info_fd is not None:
        args += ["--info-fd", str(info_fd)]
    return args


# The uid and gid the sandbox runs as on the host when the caller is root ("nobody" on Debian and most
# distributions). bwrap started by root maps the sandbox's uid 0 to the host's root, whose global knobs (sysctls,
# core_pattern) no capability drop protects; started as this uid, it makes an unprivileged user namespace whose every
# id is this one on the host.
SANDBOX_UID = SANDBOX_GID = 65534
UTIL_LINUX_HINT = ("running as root, the sandbox drops to uid 65534 with util-linux's unshare, mount and setpriv "
                   "(Debian: apt-get install util-linux mount)")

# The shell script run as root before dropping to SANDBOX_UID (sandboxed/stage.sh says what it does): read once, at
# import, and handed to ``sh -c`` as text, so a run never reads the file again.
_STAGE_SCRIPT = (Path(__file__).resolve().parent / "sandboxed" / "stage.sh").read_text(encoding="utf-8")


def runs_as_root() -> bool:
    """The caller is root, so :func:`launch_command` drops to :data:`SANDBOX_UID` before starting bwrap."""
    return os.geteuid() == 0


def launch_command(bwrap: str, options_for, command: Sequence[str], stage_dir: Optional[str]) -> List[str]:
    """The host command that starts ``bwrap options -- command``: as is for an unprivileged caller; for root, inside
    a private mount namespace that stages the Python installation (``_STAGE_SCRIPT``) and then drops to
    :data:`SANDBOX_UID` with ``setpriv`` (no supplementary groups, no capabilities, ``no_new_privs``).

    ``options_for(sources)`` builds bwrap's options given where the Python paths are found (see
    :func:`bwrap_arguments`); ``stage_dir`` is an empty directory the caller made and removes (root only)."""
    if not runs_as_root():
        return [bwrap, *options_for({}), "--", *command]
    tools = {name: shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin") for name in ("unshare", "setpriv", "sh")}
    missing = [name for name, path in tools.items() if path is None]
    if missing or stage_dir is None:
        raise SandboxUnavailable(f"sandbox='bwrap': {', '.join(missing) or 'a stage directory'} not found; "
                                 f"{UTIL_LINUX_HINT}")
    paths = list(_python_paths())
    sources = {path: f"{stage_dir}/{i}" for i, path in enumerate(paths)}
    drop = [tools["setpriv"], f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", "--clear-groups",
            "--inh-caps=-all", "--no-new-privs"]
    return [tools["unshare"], "--mount", "--propagation", "private", "--", tools["sh"], "-c", _STAGE_SCRIPT,
            "emokern-stage", stage_dir, str(len(paths)), *paths, *drop, bwrap, *options_for(sources), "--", *command]


def sandbox_info(sandbox: str = "bwrap") -> dict:
    """What a level isolates, as an experiment records it (:func:`~emokern.experiments.sandbox.check_isolation` adds
    the probe's findings).

    ``{"sandbox", "kernel_isolation"}``, and for ``"bwrap"``: ``"bwrap"`` (its version), ``"namespaces"``,
    ``"read_only"`` (the host paths bound read-only), ``"workdir"``, ``"seccomp"`` (``{"arch", "denied"}`` or None)
    with ``"seccomp_missing"`` (why not, or None); for ``"python-guard"``: ``"warning"``.

    Raises:
        ValueError: an unknown level. SandboxUnavailable: ``"bwrap"`` without bwrap on ``PATH``.
    """
    check_sandbox_name("sandbox_info", sandbox)
    if sandbox == "python-guard":
        return {"sandbox": sandbox, "kernel_isolation": False, "warning": GUARD_WARNING}
    path = find_bwrap()
    arch = _seccomp_arch()
    libraries = [p for p in _SYSTEM_LIBRARY_DIRS if os.path.isdir(p) and not os.path.islink(p)]
    return {"sandbox": sandbox, "kernel_isolation": True, "bwrap": _bwrap_version(path),
            "namespaces": ["user", "mount", "pid", "network", "ipc", "uts", "cgroup (where the kernel has it)"],
            "host_uid": SANDBOX_UID if runs_as_root() else os.geteuid(),
            "proc": None,
            "read_only": libraries + list(_python_paths()) + [p for p in ["/etc/ld.so.cache"] if os.path.isfile(p)],
            "workdir": f"{WORKDIR} (a tmpfs of workdir_mb MiB)",
            "seccomp": {"arch": arch, "denied": sorted(n for n, row in _DENIED_SYSCALLS.items()
                                                       if row[_SECCOMP_ARCHES[arch][1]] is not None),
                        "socket_families": ["AF_UNIX"]}
            if arch else None,
            "seccomp_missing": None if arch else (f"no system-call table for {platform.machine()} "
                                                  f"({8 * struct.calcsize('P')}-bit Python) in this module")}


def check_sandbox_name(where: str, sandbox: str) -> None:
    """ValueError naming ``where`` unless ``sandbox`` is one of :data:`SANDBOXES`."""
    if sandbox not in SANDBOXES:
        raise ValueError(f"{where}: sandbox must be one of {list(SANDBOXES)}; got {sandbox!r}")
