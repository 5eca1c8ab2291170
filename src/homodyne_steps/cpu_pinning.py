"""Pin a stage process to its own CPU cores before JAX starts (``--threads``).

Snakemake does not pin local jobs, and XLA's CPU thread pool follows the affinity mask
at backend start, so two concurrent JAX jobs would each use every core. Each core is
claimed with an exclusive lock file in a private folder of the user's temp directory.
"""

from __future__ import annotations

import sys

_CORE_LOCKS: list = []  # held open for the process lifetime


def pin_threads(n: int) -> None:
    """Restrict this process to ``n`` of its allowed CPUs (before JAX is imported).

    Snakemake does not pin local jobs, and XLA's CPU pool follows the affinity mask at
    backend start: without this, two concurrent JAX jobs would each use every core.
    Concurrent jobs must also get *different* cores, so each core is claimed with an
    exclusive lock file (released when the process exits, however it exits); if too few
    are free (oversubscription), the remaining cores are taken by rotation. Cores are only
    ever chosen from the current mask: under Slurm (task/affinity) that is the job's
    allocation, and with threads = --cpus-per-task (profiles/slurm) nothing changes.
    """
    import fcntl
    import os

    if n < 1:
        raise SystemExit("homodyne-steps: --threads must be >= 1")
    if not hasattr(os, "sched_setaffinity"):
        return
    allowed = sorted(os.sched_getaffinity(0))
    if n >= len(allowed):
        return
    lock_dir = _private_lock_dir()
    start = os.getpid() % len(allowed)
    order = allowed[start:] + allowed[:start]
    chosen: list[int] = []
    for cpu in order if lock_dir else ():
        if len(chosen) == n:
            break
        # No O_TRUNC, no symlinks followed: a lock file only ever holds a lock.
        try:
            fd = os.open(
                os.path.join(lock_dir, f"cpu{cpu}.lock"),
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except OSError:  # a symlink planted in our folder, or no access: not this core
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _CORE_LOCKS.append(fd)
        chosen.append(cpu)
    for cpu in order:  # oversubscribed (or no lock folder): share cores rather than wait
        if len(chosen) == n:
            break
        if cpu not in chosen:
            chosen.append(cpu)
    os.sched_setaffinity(0, chosen)


def _warn(message: str) -> None:
    print(f"homodyne-steps: {message}", file=sys.stderr)


def _private_lock_dir() -> str | None:
    """``$TMPDIR/homodyne-steps-cores-<uid>``, made 0700 and checked to be ours.

    /tmp is shared: another user could plant a symlink or a folder of their own there
    and have our lock files point at the runner's files. The folder must be a real
    directory (not a link) owned by this user with no group/other access; otherwise CPU
    pinning goes on without locks (cores by rotation) and says why on stderr.
    """
    import os
    import stat
    import tempfile

    lock_dir = os.path.join(tempfile.gettempdir(), f"homodyne-steps-cores-{os.getuid()}")
    try:
        os.mkdir(lock_dir, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        _warn(f"cannot create {lock_dir} ({exc.strerror}); pinning cores without locks")
        return None
    info = os.lstat(lock_dir)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        _warn(
            f"{lock_dir} is not a directory owned by uid {os.getuid()}; pinning cores "
            "without locks (remove it, or set TMPDIR)"
        )
        return None
    if info.st_mode & 0o077:  # ours, but made with a loose umask by an older version
        os.chmod(lock_dir, 0o700, follow_symlinks=False)
    return lock_dir
