"""The data that flows between the data stages (load → filter → preprocess → qc).

Names are the reference package's (``wavevector_q_list``, ``phi_angles_list``, ``t1``,
``t2``, ``c2_exp``) so its users recognise them in our ``.npz`` files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from homodyne_steps.errors import DataError
from homodyne_steps.io.serialise import SerialisationError, read_npz, write_npz

ARRAY_KEYS = ("wavevector_q_list", "phi_angles_list", "t1", "t2", "c2_exp", "dt")


@dataclass(frozen=True)
class XpcsData:
    """Two-time correlation data of one dataset at one q.

    Attributes:
        wavevector_q_list: (n_phi,) q of each angle bin in 1/Å.
        phi_angles_list: (n_phi,) angle of each bin in degrees.
        t1, t2: (n_t,) times in s (identical 1-D grids, uniform step ``dt``).
        c2_exp: (n_phi, n_t, n_t) symmetric two-time correlation matrices.
        dt: time step in s.
        c2_diagonal: (n_phi, n_t) the correlator's own diagonal before ``preprocess``
            replaced it (1 + contrast + the shot-noise excess, on c2_exp's scale), or
            None; the speckle noise model reads its level.
    """

    wavevector_q_list: np.ndarray
    phi_angles_list: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    c2_exp: np.ndarray
    dt: float
    c2_diagonal: np.ndarray | None = None

    def __post_init__(self) -> None:
        n_phi = np.shape(self.phi_angles_list)[0] if np.ndim(self.phi_angles_list) == 1 else -1
        n_t = np.shape(self.t1)[0] if np.ndim(self.t1) == 1 else -1
        problems = []
        if n_phi < 0 or np.shape(self.wavevector_q_list) != (n_phi,):
            problems.append(
                f"wavevector_q_list {np.shape(self.wavevector_q_list)} and phi_angles_list "
                f"{np.shape(self.phi_angles_list)} must be 1-D of equal length"
            )
        if n_t < 0 or np.shape(self.t2) != (n_t,):
            problems.append(f"t1 {np.shape(self.t1)} and t2 {np.shape(self.t2)} must be equal 1-D")
        if np.shape(self.c2_exp) != (n_phi, n_t, n_t):
            problems.append(
                f"c2_exp has shape {np.shape(self.c2_exp)}, expected {(n_phi, n_t, n_t)}"
            )
        if self.c2_diagonal is not None and np.shape(self.c2_diagonal) != (n_phi, n_t):
            problems.append(
                f"c2_diagonal has shape {np.shape(self.c2_diagonal)}, expected {(n_phi, n_t)}"
            )
        if not (np.isfinite(self.dt) and self.dt > 0):
            problems.append(f"dt must be > 0, got {self.dt}")
        if problems:
            raise DataError("inconsistent dataset: " + "; ".join(problems))

    @property
    def n_phi(self) -> int:
        return int(self.phi_angles_list.shape[0])

    @property
    def n_t(self) -> int:
        return int(self.t1.shape[0])

    @property
    def q(self) -> float:
        """The dataset's q (mean over angle bins) in 1/Å."""
        return float(np.mean(self.wavevector_q_list))

    def replace(self, **changes) -> XpcsData:
        return replace(self, **changes)

    def select_angles(self, index) -> XpcsData:
        """The angle bins ``index`` (indices or mask), every per-angle array alike."""
        idx = np.arange(self.n_phi)[index]
        return replace(
            self,
            wavevector_q_list=np.asarray(self.wavevector_q_list)[idx],
            phi_angles_list=np.asarray(self.phi_angles_list)[idx],
            c2_exp=np.asarray(self.c2_exp)[idx],
            c2_diagonal=None if self.c2_diagonal is None else np.asarray(self.c2_diagonal)[idx],
        )

    def to_npz(self, path: str | os.PathLike[str], **extra: np.ndarray) -> Path:
        """Write the arrays (plus ``extra`` arrays) atomically; no pickled objects."""
        return write_npz(
            path,
            wavevector_q_list=self.wavevector_q_list,
            phi_angles_list=self.phi_angles_list,
            t1=self.t1,
            t2=self.t2,
            c2_exp=self.c2_exp,
            dt=np.float64(self.dt),
            **({} if self.c2_diagonal is None else {"c2_diagonal": self.c2_diagonal}),
            **extra,
        )

    @classmethod
    def from_npz(cls, path: str | os.PathLike[str]) -> XpcsData:
        try:
            arrays = read_npz(path, required=ARRAY_KEYS)
        except SerialisationError as exc:
            raise DataError(str(exc)) from None
        return cls(
            wavevector_q_list=arrays["wavevector_q_list"],
            phi_angles_list=arrays["phi_angles_list"],
            t1=arrays["t1"],
            t2=arrays["t2"],
            c2_exp=arrays["c2_exp"],
            dt=float(arrays["dt"]),
            c2_diagonal=arrays.get("c2_diagonal"),
        )
