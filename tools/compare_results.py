"""Compare two results trees value by value: the proof that a refactor changed no result.

Usage: ``python tools/compare_results.py RESULTS_A RESULTS_B`` (exit 0 when identical).

Every ``.json`` value, every ``.npz`` array, every ``.csv`` cell and every dataset and
attribute of every ``.nc`` (HDF5) file under the two folders must be equal, bit for bit
(NaN equals NaN). Timings differ from run to run and are skipped: JSON keys that name a
duration or a speed (``duration_s``, ``execution_time``, ``throughput_points_per_sec``,
...), netCDF attributes of the same kind, and the HDF5 dimension-scale references
(``DIMENSION_LIST``, ``REFERENCE_LIST``: object addresses, different in every file).
Figures (``.png``) are compared by presence only: their bytes carry a Matplotlib version
stamp but no result. Both runs must have been made in the same folder (records hold
absolute paths).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import h5py
import numpy as np

TIMING_KEY = re.compile(
    r"(duration|timing|elapsed|wall|seconds_per|_time_s$|time_ms|per_s$|per_sec$|execution_time"
    r"|_time_incl|^seconds$)"
)
# HDF5 dimension-scale bookkeeping: object references, different in every file.
H5_REFERENCE_ATTRS = ("DIMENSION_LIST", "REFERENCE_LIST")


def _is_timing(key: str) -> bool:
    return bool(TIMING_KEY.search(key.lower()))


def _json_diff(a, b, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if _is_timing(str(key)):
                continue
            if key not in a or key not in b:
                out.append(f"{where}.{key}: only in {'B' if key not in a else 'A'}")
            else:
                _json_diff(a[key], b[key], f"{where}.{key}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: lengths {len(a)} != {len(b)}")
        for k, (x, y) in enumerate(zip(a, b, strict=False)):
            _json_diff(x, y, f"{where}[{k}]", out)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
        out.append(f"{where}: {a!r} != {b!r}")


def _arrays_equal(x: np.ndarray, y: np.ndarray) -> bool:
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if x.dtype.kind in "fc":
        return bool(np.array_equal(x, y, equal_nan=True))
    return bool(np.array_equal(x, y))


def _npz_diff(a: Path, b: Path, name: str, out: list[str]) -> None:
    with np.load(a, allow_pickle=False) as za, np.load(b, allow_pickle=False) as zb:
        for key in sorted(set(za.files) | set(zb.files)):
            if key not in za.files or key not in zb.files:
                out.append(f"{name}:{key}: only in one file")
            elif not _arrays_equal(za[key], zb[key]):
                out.append(f"{name}:{key}: arrays differ")


def _h5_diff(a: Path, b: Path, name: str, out: list[str]) -> None:
    def walk(h5: h5py.File) -> dict[str, h5py.Dataset | h5py.Group]:
        found: dict = {"/": h5}
        h5.visititems(lambda k, v: found.__setitem__(k, v))
        return found

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        na, nb = walk(fa), walk(fb)
        for key in sorted(set(na) | set(nb)):
            if key not in na or key not in nb:
                out.append(f"{name}:{key}: only in one file")
                continue
            x, y = na[key], nb[key]
            if isinstance(x, h5py.Dataset) and not _arrays_equal(np.asarray(x[()]),
                                                                 np.asarray(y[()])):  # fmt: skip
                out.append(f"{name}:{key}: data differ")
            for attr in sorted(set(x.attrs) | set(y.attrs)):
                if _is_timing(attr) or attr in H5_REFERENCE_ATTRS or attr == "created_at":
                    continue
                if attr not in x.attrs or attr not in y.attrs:
                    out.append(f"{name}:{key}@{attr}: only in one file")
                elif not _arrays_equal(np.asarray(x.attrs[attr]), np.asarray(y.attrs[attr])):
                    out.append(f"{name}:{key}@{attr}: differ")


def compare(root_a: Path, root_b: Path) -> list[str]:
    """Every difference between the two results trees (empty: identical)."""
    out: list[str] = []
    files_a = {p.relative_to(root_a) for p in root_a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(root_b) for p in root_b.rglob("*") if p.is_file()}
    for rel in sorted(files_a ^ files_b):
        out.append(f"{rel}: only in {'A' if rel in files_a else 'B'}")
    for rel in sorted(files_a & files_b):
        a, b, name = root_a / rel, root_b / rel, str(rel)
        if rel.suffix == ".json":
            _json_diff(json.loads(a.read_text()), json.loads(b.read_text()), name, out)
        elif rel.suffix == ".npz":
            _npz_diff(a, b, name, out)
        elif rel.suffix == ".nc":
            _h5_diff(a, b, name, out)
        elif rel.suffix in (".csv", ".txt", ".html"):
            if a.read_text() != b.read_text():
                out.append(f"{name}: text differs")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    diffs = compare(Path(argv[0]), Path(argv[1]))
    for line in diffs[:200]:
        print(line)
    print(f"{len(diffs)} differences" if diffs else "identical (timings skipped)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
