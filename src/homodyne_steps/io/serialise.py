"""The one serialisation layer: atomic writes, strict JSON, pickle-free NPZ.

Every output file of the package goes through here, so a crash never leaves a
half-written file under its final name (write to a temporary sibling, fsync, rename),
JSON never contains NaN/Infinity tokens, and NPZ files hold plain numeric/string arrays
that load with ``allow_pickle=False``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import socket
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from homodyne_steps.errors import HomodyneStepsError


class SerialisationError(HomodyneStepsError, ValueError):
    """A value cannot be written (or a file read back) in our formats."""


_HOST = "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname()) or "host"


def _temp_prefix(final: Path, pid: int) -> str:
    return f".{final.stem}.{_HOST}.{pid}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary siblings of ``path`` left by killed writers on this host.

    A writer killed with SIGKILL (or by a cluster's time limit) cannot run its cleanup, so
    its ``.<stem>.<host>.<pid>.<random>.tmp<suffix>`` stays. A temp is stale when it was
    made on this host by a process that no longer runs; temps of live processes and of
    other hosts (a shared file system) are left alone. Returns the removed paths.
    """
    final = Path(path)
    prefix = f".{final.stem}.{_HOST}."
    removed = []
    if not final.parent.is_dir():
        return removed
    for tmp in final.parent.glob(f".{glob.escape(final.stem)}.*.tmp{glob.escape(final.suffix)}"):
        rest = tmp.name[len(prefix) :] if tmp.name.startswith(prefix) else ""
        pid_text = rest.split(".", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    The temporary name keeps the final suffix (h5py/numpy pick formats by suffix) and
    lives in the same directory so the rename is atomic. On error it is removed; temps
    that killed writers left beside ``path`` are removed first (:func:`remove_stale_temps`).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    fd, tmp_name = tempfile.mkstemp(
        prefix=_temp_prefix(final, os.getpid()), suffix=f".tmp{final.suffix}", dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def finite_or_none(x: Any) -> float | None:
    """``x`` as a float when it is a finite number, else None (JSON has no NaN: null)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def to_jsonable(value: Any, *, where: str = "$", null_non_finite: bool = False) -> Any:
    """Convert numpy scalars/arrays and paths to JSON types.

    NaN/Inf is refused, naming its path, unless ``null_non_finite``: then it becomes null
    (for records that hold undefined numbers by design, e.g. the heterogeneity p-value of
    a single kept CMC shard).
    """
    nested = {"null_non_finite": null_non_finite}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, where=f"{where}.{k}", **nested) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v, where=f"{where}[{k}]", **nested) for k, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), where=where, **nested)
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        x = float(value)
        if not math.isfinite(x) and null_non_finite:
            return None
        if not math.isfinite(x):
            raise SerialisationError(
                f"cannot write non-finite number {x} at {where} to JSON; "
                "use null for a missing value"
            )
        return x
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise SerialisationError(f"cannot write {type(value).__name__} at {where} to JSON")


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON, atomically."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, naming the file in any error."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SerialisationError(f"cannot read JSON file {p}: {exc.strerror}") from None

    def _reject(token: str) -> float:
        raise SerialisationError(f"{p}: non-standard JSON number {token}")

    try:
        return json.loads(text, parse_constant=_reject)
    except json.JSONDecodeError as exc:
        raise SerialisationError(f"{p} is not valid JSON: {exc}") from None


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON file that must hold an object (a record), naming the file in any error."""
    rec = read_json(path)
    if not isinstance(rec, dict):
        raise SerialisationError(f"{path}: expected a JSON object, got {type(rec).__name__}")
    return rec


def write_npz(path: str | os.PathLike[str], /, *, compress: bool = False, **arrays: Any) -> Path:
    """Write arrays to an .npz atomically; object arrays are refused.

    A value may be a zero-argument callable returning the array: it is called when its
    turn comes and released right after, so large outputs are never all in memory at
    once. Uncompressed by default: measured c2 is noise-dominated in its low bits, so
    zlib saves ~10 % of the size at ~20× the write and read time of a 23 × 1000² dataset.
    """
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=method, allowZip64=True) as zf:
            for key, value in arrays.items():
                arr = np.asarray(value() if callable(value) else value)
                if arr.dtype.kind not in "biufcSU":
                    raise SerialisationError(
                        f"array {key!r} has dtype {arr.dtype}; only numeric and string "
                        "arrays are written (no pickled objects)"
                    )
                with zf.open(f"{key}.npy", "w", force_zip64=True) as fh:
                    # (ascontiguousarray would turn a 0-d array into shape (1,))
                    arr = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
                    np.lib.format.write_array(fh, arr, allow_pickle=False)
                del arr
    return Path(path)


def read_npz(path: str | os.PathLike[str], required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Load every array of a .npz (never unpickling); check ``required`` keys exist."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            out = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise SerialisationError(f"cannot read NPZ file {p}: {exc}") from None
    missing = [k for k in required if k not in out]
    if missing:
        raise SerialisationError(f"{p} lacks arrays {missing}; it has {sorted(out)}")
    return out
