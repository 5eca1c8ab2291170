"""The ``load`` stage: read one q ring of an APS file (:mod:`homodyne_steps.io.aps_reader`)
and write ``loaded.npz`` with its record ``loaded.json``."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from homodyne_steps import __version__
from homodyne_steps.errors import DataError, HomodyneStepsError
from homodyne_steps.io.aps_reader import _check_arguments, read_aps
from homodyne_steps.io.data_files import (
    DtSource,
    LoadedFrames,
    LoadedQ,
    LoadedReport,
    LoadedShapes,
    LoadedSource,
    LoadedStorage,
    SkippedBin,
)
from homodyne_steps.io.dataset import XpcsData
from homodyne_steps.settings import check_keys

SETTINGS_KEYS = ("q", "dt", "frames", "q_tolerance", "storage", "missing_frame_factors",
                 "time_origin")  # fmt: skip


@dataclass(frozen=True)
class LoadSettings:
    """What the load stage reads (a dataset entry's load keys; units: q 1/Å, dt s).

    ``start_frame``/``end_frame`` are the config's ``frames: {start, end}`` (1-based,
    inclusive; end −1 = the last frame). The other fields are :func:`read_aps`'s options.
    """

    q: float
    start_frame: int = 1
    end_frame: int = -1
    dt: float | None = None
    q_tolerance: float = 0.1
    storage: str = "auto"
    missing_frame_factors: str = "error"
    time_origin: str = "file"

    def __post_init__(self) -> None:
        _check_arguments(self.q, self.start_frame, self.end_frame, self.dt, self.q_tolerance,
                         self.storage, self.missing_frame_factors, self.time_origin)  # fmt: skip

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any], where: str = "load") -> LoadSettings:
        m = dict(m or {})
        check_keys(m, set(SETTINGS_KEYS), where)
        if "q" not in m:
            raise HomodyneStepsError(f"{where}: the target q (1/Å) is required")
        frames = dict(m.pop("frames", None) or {})
        check_keys(frames, {"start", "end"}, f"{where}.frames")
        return cls(start_frame=frames.get("start", 1), end_frame=frames.get("end", -1), **m)

    def read_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`read_aps` / :func:`load_stage` besides q."""
        options = asdict(self)
        del options["q"]
        return options


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_stage(
    data_path: str | os.PathLike[str],
    q: float,
    out_npz: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    **read_options: Any,
) -> XpcsData:
    """The ``load`` stage: :func:`read_aps`, then write ``out_npz`` and its JSON record.

    ``read_options`` are :func:`read_aps`'s keyword arguments (frames, dt, q_tolerance,
    storage, missing_frame_factors, time_origin; :meth:`LoadSettings.read_options`). The
    record holds the source (absolute path, sha256, format, how matrices were paired
    with bins), q target/selected/members, phi list, bin labels, skipped bins, dt and
    where it came from, the time origin, frames, storage found, shapes and the stage
    duration in s. Nothing is written when reading fails; the NPZ is removed if the JSON
    cannot be.
    """
    started = time.perf_counter()
    out_npz, out_json = Path(out_npz), Path(out_json)
    if out_npz.resolve() == out_json.resolve():
        raise DataError(f"out_npz and out_json are the same path: {out_npz}")
    res = read_aps(data_path, q, **read_options)
    data = XpcsData(
        wavevector_q_list=res["wavevector_q_list"],
        phi_angles_list=res["phi_angles_list"],
        t1=res["t1"],
        t2=res["t2"],
        c2_exp=res["c2_exp"],
        dt=res["dt"],
    )
    data.to_npz(out_npz)
    try:
        _record(res, data, out_npz, started).write(out_json)
    except BaseException:
        out_npz.unlink(missing_ok=True)
        raise
    return data


def _record(res: dict[str, Any], data: XpcsData, out_npz: Path, started: float) -> LoadedReport:
    """The ``loaded.json`` record; its duration runs from ``started`` (perf_counter) to now."""
    src = res["source"]
    return LoadedReport(
        stage="load",
        generator=f"homodyne-steps {__version__}",
        source=LoadedSource(
            path=src["path"],
            sha256=_sha256(Path(src["path"])),
            format=res["format"],
            datasets=src["datasets"],
            bin_mapping=src["bin_mapping"],
            member_prefix=src["member_prefix"],
        ),
        q=LoadedQ(
            target=src["q_target"],
            selected=src["q_selected"],
            tolerance=src["q_tolerance"],
            available=src["q_available"],
            members=src["q_members"],
            relative_spread=src["q_relative_spread"],
            grouping=src["ring_grouping"],
        ),
        phi_deg=data.phi_angles_list.tolist(),
        bin_labels=src["bin_labels"],
        skipped_bins=[SkippedBin(**b) for b in src["skipped_bins"]],
        dt_s=data.dt,
        dt_source=DtSource(**src["dt_source"]),
        time_origin=src["time_origin"],
        t_first_s=src["t_first_s"],
        frames=LoadedFrames(
            start=src["start_frame"],
            end=src["end_frame"],
            n=src["n_frames"],
            n_in_file=src["n_frames_file"],
        ),
        n_phi=data.n_phi,
        storage=LoadedStorage(**src["storage"]),
        diagonal_corrected=False,
        shapes=LoadedShapes(
            c2_exp=list(np.shape(data.c2_exp)),
            t1=list(np.shape(data.t1)),
            t2=list(np.shape(data.t2)),
        ),
        c2_dtype=str(data.c2_exp.dtype),
        outputs={"npz": str(out_npz.resolve())},
        duration_s=time.perf_counter() - started,
    )
