r"""A speckle-level simulator: particles, pixels, photons, and the two-time expectation.

The seed simulator (``stages/simulate.py``) draws c2 from the model itself, so a fit to
its files can only confirm that the model agrees with itself. This module instead makes
detector frames the way an experiment does (particles that diffuse and are advected by a
shear flow, the coherent field at each pixel, photon counting) so that the correlator
output (``data/correlator.py``) can be compared with the model's *physics*.

Units: q in 1/Å, lengths in Å, t in s, D in Å²/s, shear rate in 1/s, angles in degrees.

Sample
------
``n_particles`` particles with 3-D positions: ``x`` along the flow, ``z`` the other
detector-plane direction, ``y`` the height across the gap (along the beam). Frames are at
``t_k = dt k``, ``k = 0 .. n_frames-1``. Over the step ``k → k+1`` every particle gets
independent Gaussian displacements on all three axes, each of variance exactly
``∫_{t_k}^{t_{k+1}} D dt``, and moves along ``x`` by ``y_k ∫_{t_k}^{t_{k+1}} γ̇ dt``
(``y_k`` its height at the start of the step)::

    D(t) = D0 t^alpha + D_offset          γ̇(t) = gamma_dot_t0 t^beta + gamma_dot_t_offset

Integrals are exact (``∫ t^a = (t2^{a+1} - t1^{a+1}) / (a+1)``, evaluated as
``t1^{a+1} log(t2/t1) exprel((a+1) log(t2/t1))`` so ``a = -1`` is the smooth log
limit), never a trapezoid. **Time floor:** ``t = 0`` is a frame time, and ``t^a`` is
not integrable at 0 for ``a <= -1``, so the power-law factor is evaluated at
``max(t, eps)`` with ``eps = dt/2`` (held at ``eps^a`` on ``[0, eps]``, exact above it);
this only touches the first frame step. The constant parts are integrated as given.
Heights ``y`` are uniform on ``[0, L]`` (``gap="uniform"``, the physical Couette gap) or
the sum of two uniforms on ``[0, L/π]``, a triangle on ``[0, 2L/π]``
(``gap="triangular"``), whose characteristic function reproduces the seed's
``sinc²`` field form. ``y`` also diffuses; over a frame window ``∫D ≪ L²``, so the
wall-free drift of a few hundred Å out of a 2e6 Å gap is immaterial and no walls are
imposed. Lateral positions are uniform on a square of side ``box`` (see below).

Detector
--------
Cells are ``q_centres`` rings × ``phi_centres`` sectors. Each cell has
``pixels_per_cell`` pixels at random ``|q_p| = q (1 + ring_width (u - 1/2))`` and
``φ_p = φ + sector_width_deg (v - 1/2)`` (``u, v`` uniform on [0, 1]). A pixel's
scattering vector has flow component ``|q_p| cos(φ0 - φ_p)`` and in-plane transverse
component ``|q_p| sin(φ0 - φ_p)`` (no ``y`` component: small angle). The field is
``E_p(k) = Σ_n exp(i q_p · r_n(k))``. There are ``n_modes`` incoherent modes: the
particles are split into ``n_modes`` disjoint groups (the coherence volumes), each group
makes its own speckle pattern and their intensities add, so the contrast is close to
``1/n_modes``. The intensity is scaled so its expectation per pixel is
``photons_per_pixel × drift(k)`` with ``drift(k) = 1 + drift (k/(n-1) - 1/2)`` (a
linear ramp of relative size ``drift`` centred on 1), and counts are Poisson draws.
Frames listed in ``dropped_frames`` are **all-zero** frames: a photon-counting detector
that loses a frame delivers an empty one into the stack (counts are integers, so NaN is
not an option for them); the correlator then returns a NaN row/column for that frame.

The box: pixels must see independent speckles, i.e. their spacing in q must exceed the
speckle width ``2π/box`` by far. ``box = 1000 × 2π / s`` with ``s`` the mean pixel
spacing in the smallest cell (``s² = q_min² ring_width sector_width / pixels``), so
neighbouring pixels are ~1000 speckles apart (about 1e9 Å with the defaults; only a
bookkeeping size: phases are reduced modulo 2π in float64 before float32 trigonometry).

Expected c2 (derivation)
------------------------
With ``N_m`` particles in mode ``m``, ``N = Σ N_m`` and uniform lateral positions, only
the pairings that cancel the lateral phases survive the ensemble average, giving exactly
``⟨I(t1) I(t2)⟩ / ⟨I⟩² = 1 + β |g1(t1, t2)|²`` with ``β = Σ N_m (N_m - 1) / N²``
(``≈ 1/n_modes``; the ``-1`` is the finite-particle, non-Gaussian correction) and
``g1 = ⟨exp(i q·Δr)⟩`` for one particle:

- diffusion: ``Δr`` Gaussian with variance ``∫_{t1}^{t2} D`` per axis, so
  ``|g1_diff|² = exp(-q² ∫_{t1}^{t2} D dt)``;
- shear (uniform ``y`` on [0, L]): ``⟨exp(i a y)⟩ = exp(i a L/2) sinc(a L/2)`` with
  ``a = q cos(φ0 - φ) ∫γ̇``, so ``|g1_shear|² = sinc²(Ψ)``, ``Ψ = (q L/2) cos(φ0-φ) ∫γ̇``
  (``shear="physical"``);
- shear (triangular ``y``, the sum of two uniforms on [0, L/π]): the characteristic
  function is the square of one uniform's, ``|g1_shear|² = sinc⁴(Φ)``,
  ``Φ = (q L/2π) cos(φ0-φ) ∫γ̇`` — the seed's form (``shear="homodyne"``).

Photon counting adds ``1/⟨n⟩`` on the diagonal only (``t1 = t2``). The correlator is a
ratio of pixel averages, which is biased at ``O(1/P)`` for ``P`` pixels: to first order in
``1/P``, for circular-Gaussian speckle with Poisson counts (the Poisson terms cancel
exactly, as does any frame-wise intensity drift),
``E[ĉ2] - 1 = c (1 - (1 + 2β - c)/P)``, ``c = β |g1|²``: about -0.8 % of ``c2 - 1``
with the defaults (comparable to the noise of a few dozen seeds averaged), -10 % with
12 pixels. :func:`expected_c2` includes it with ``pixel_bias=True``. Averaging ``|g1|²`` over the
pixels' spread of ``(|q|, φ)`` in a cell is available as ``cell_average=True``
(Gauss–Legendre quadrature over the cell); it is a small effect with the narrow
default cells.

Defaults and why
----------------
The geometry is the laminar-flow reference case (``q = 0.0054``, ``L = 2e6``,
``dt = 0.1``, its six angles and parameters) at the demo size of 120 frames, where the
diffusive decay and the first shear zeros fall inside the window.
``pixels_per_cell = 180``: a narrow real ring sector holds ~10²–10³ pixels, and 180 keeps
the ratio bias near 1 % while a frame costs little. ``photons_per_pixel = 10``: the
diagonal shot-noise excess (1/10) stays visible without drowning the off-diagonal signal.
``n_modes = 4``: contrast ≈ 0.25, close to the reference contrast 0.3 and typical of
partially coherent beams. ``n_particles = 16384``: 4096 per mode. Every pixel of a cell
sees the same particles move, so the realised single-particle average ĝ1 = mean exp(i
q·Δr), which no pixel average removes, fluctuates by ~√(2/N) per frame step, and the
realised heights freeze one shear profile per file: a sample noise shared by the whole
matrix, which a real scattering volume (~10⁹ particles) does not have. With 2048 particles
it biased alpha and phi0; with 16384 it does not (measurements: docs/model.md, "The
simulator's particles"). A file costs ~6 s on one core, linear in ``n_particles``; tests
that only need speckle-like files set fewer.
``ring_width = 0.01`` and ``sector_width_deg = 1``: cells close to one ``(q, φ)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from homodyne_steps.errors import ConfigError, ParameterError, SimulationError
from homodyne_steps.physics.reference import REFERENCE_CASES, REFERENCE_GEOMETRY
from homodyne_steps.physics.registry import LAMINAR_FLOW, REGISTRY, STATIC
from homodyne_steps.settings import get_choice, get_int, get_number

GAPS = ("uniform", "triangular")
SHEAR_FORMS = ("physical", "homodyne")
BOX_SPECKLES = 1000.0  # pixel spacing / speckle width in q
CHUNK_ELEMENTS = 1 << 21  # (frames × pixels × particles) per vectorised block
REBASE_FRAMES = 32  # frames between float64 re-reductions of the absolute phases
EXPREL_SERIES_BELOW = 1e-6
QUADRATURE_NODES = 8  # per axis, for cell_average

_LAMINAR = REFERENCE_CASES[LAMINAR_FLOW]


def _default_params() -> dict[str, float]:
    return dict(_LAMINAR["params"])


@dataclass(frozen=True)
class SpeckleSettings:
    """Everything that determines a speckle simulation (deterministic for a seed).

    Attributes:
        params: physical parameters by registry name: ``D0, alpha, D_offset`` (static) or
            those plus ``gamma_dot_t0, beta, gamma_dot_t_offset, phi0`` (laminar flow).
        q_centres: ring centres in 1/Å.  phi_centres: sector centres in degrees.
        L: gap in Å.  dt: frame period in s.  n_frames: frames (the C2 size).
        n_particles: particles in all modes together.  n_modes: incoherent modes.
        pixels_per_cell: pixels in each (ring, sector) cell.
        photons_per_pixel: mean counts per pixel per frame.
        ring_width: full relative width of a ring in |q|.
        sector_width_deg: full width of a sector in degrees.
        gap: ``"uniform"`` (heights on [0, L]) or ``"triangular"`` (on [0, 2L/π]).
        drift: relative size of a linear intensity ramp over the run (0 = none).
        dropped_frames: frame indices delivered as all-zero frames.
        seed: random seed.
    """

    params: Mapping[str, float] = field(default_factory=_default_params)
    q_centres: Sequence[float] = (REFERENCE_GEOMETRY["q"],)
    phi_centres: Sequence[float] = tuple(_LAMINAR["phi_deg"])
    L: float = REFERENCE_GEOMETRY["L"]
    dt: float = REFERENCE_GEOMETRY["dt"]
    n_frames: int = 120
    n_particles: int = 16384
    pixels_per_cell: int = 180
    photons_per_pixel: float = 10.0
    n_modes: int = 4
    ring_width: float = 0.01
    sector_width_deg: float = 1.0
    gap: str = "uniform"
    drift: float = 0.0
    dropped_frames: Sequence[int] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        parsed = _parse({f.name: getattr(self, f.name) for f in fields(self)}, "speckle")
        for name, value in parsed.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any], where: str = "simulate") -> SpeckleSettings:
        """Settings from a config mapping; every key is checked, errors name ``where.key``.

        Missing keys take the defaults; ``params`` must hold exactly the static or the
        laminar-flow names, each within its registry bounds.
        """
        return cls(**_parse(m, where))

    # -- derived quantities ---------------------------------------------------------
    @property
    def mode(self) -> str:
        return LAMINAR_FLOW if "gamma_dot_t0" in self.params else STATIC

    @property
    def times(self) -> np.ndarray:
        return self.dt * np.arange(self.n_frames)

    def mode_sizes(self) -> np.ndarray:
        """Particles in each incoherent mode (the groups differ by at most one)."""
        edges = np.linspace(0, self.n_particles, self.n_modes + 1).round().astype(np.int64)
        return np.diff(edges)

    @property
    def contrast(self) -> float:
        """β = Σ N_m (N_m - 1) / N², the exact ensemble contrast (≈ 1/n_modes)."""
        n_m = self.mode_sizes().astype(np.float64)
        return float(np.sum(n_m * (n_m - 1.0)) / float(self.n_particles) ** 2)

    @property
    def box(self) -> float:
        """Side in Å of the lateral square the particles fill (see the module docstring)."""
        q_min = min(self.q_centres)
        cell_area = q_min**2 * self.ring_width * math.radians(self.sector_width_deg)
        spacing = math.sqrt(cell_area / self.pixels_per_cell)
        return BOX_SPECKLES * 2.0 * math.pi / spacing

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly values of every setting."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping):
                value = {k: float(v) for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------
SETTINGS_KEYS = tuple(f.name for f in fields(SpeckleSettings))


def _as_simulation_error(fn, *args, **kwargs):
    """Run a ``settings`` helper, re-raising its ConfigError as a SimulationError."""
    try:
        return fn(*args, **kwargs)
    except ConfigError as exc:
        raise SimulationError(str(exc)) from None


def _integer(m: Mapping[str, Any], key: str, default: int, where: str, minimum: int) -> int:
    value = m.get(key, default)
    if isinstance(value, np.integer):
        value = value.item()
    return _as_simulation_error(get_int, {key: value}, key, default, where, minimum=minimum)


def _number(m: Mapping[str, Any], key: str, default: float, where: str, **bounds) -> float:
    value = m.get(key, default)
    if isinstance(value, np.floating | np.integer):
        value = value.item()
    return _as_simulation_error(get_number, {key: value}, key, default, where, **bounds)


def _number_list(m: Mapping[str, Any], key: str, default: Sequence[float], where: str):
    value = m.get(key, default)
    if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__len__"):
        raise SimulationError(f"{where}.{key}: expected a list of numbers, got {value!r}")
    out = []
    for x in np.asarray(value, dtype=object).ravel() if len(value) else []:
        if isinstance(x, np.floating | np.integer):
            x = x.item()
        if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x):
            raise SimulationError(f"{where}.{key}: expected finite numbers, got {x!r}")
        out.append(float(x))
    if not out:
        raise SimulationError(f"{where}.{key}: expected a non-empty list of numbers")
    if len(set(out)) != len(out):
        raise SimulationError(f"{where}.{key}: has repeated values: {out}")
    return tuple(out)


def _params(m: Mapping[str, Any], where: str) -> dict[str, float]:
    raw = m.get("params", None)
    if raw is None:
        return _default_params()
    if not isinstance(raw, Mapping):
        raise SimulationError(f"{where}.params: expected a mapping name -> value, got {raw!r}")
    for name in raw:
        if name not in REGISTRY.physical_names(LAMINAR_FLOW):
            raise SimulationError(
                f"{where}.params.{name}: not a physical parameter; expected "
                f"{list(REGISTRY.physical_names(STATIC))} (static) or "
                f"{list(REGISTRY.physical_names(LAMINAR_FLOW))} (laminar flow)"
            )
    try:
        mode = REGISTRY.infer_mode(list(raw))
    except ParameterError as exc:
        raise SimulationError(f"{where}.params: {exc}") from None
    out = {}
    for name in REGISTRY.physical_names(mode):
        value = raw[name]
        if isinstance(value, np.floating | np.integer):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SimulationError(f"{where}.params.{name}: expected a number, got {value!r}")
        try:
            out[name] = REGISTRY.check_value(name, value)
        except ParameterError as exc:
            raise SimulationError(f"{where}.params.{name}: {exc}") from None
    return out


def _parse(m: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Every setting checked and normalised (tuples of floats, ints, floats)."""
    if not isinstance(m, Mapping):
        raise SimulationError(f"{where}: expected a mapping of settings, got {m!r}")
    unknown = sorted(set(m) - set(SETTINGS_KEYS))
    if unknown:
        raise SimulationError(
            f"{where}.{unknown[0]}: unknown key; expected one of {sorted(SETTINGS_KEYS)}"
        )
    d = {f.name: f.default for f in fields(SpeckleSettings) if f.name != "params"}
    out: dict[str, Any] = {"params": _params(m, where)}
    q = _number_list(m, "q_centres", d["q_centres"], where)
    if min(q) <= 0:
        raise SimulationError(f"{where}.q_centres: every ring must be at q > 0 (1/Å), got {q}")
    out["q_centres"] = q
    phi = _number_list(m, "phi_centres", d["phi_centres"], where)
    if any(not -180.0 < p <= 180.0 for p in phi):
        raise SimulationError(f"{where}.phi_centres: angles must lie in (-180, 180] deg, got {phi}")
    out["phi_centres"] = phi
    positive = {"minimum": 0.0, "exclusive_minimum": True}
    out["L"] = _number(m, "L", d["L"], where, **positive)
    out["dt"] = _number(m, "dt", d["dt"], where, **positive)
    out["n_frames"] = _integer(m, "n_frames", d["n_frames"], where, 3)
    out["n_modes"] = _integer(m, "n_modes", d["n_modes"], where, 1)
    out["n_particles"] = _integer(m, "n_particles", d["n_particles"], where, 1)
    if out["n_particles"] < 16 * out["n_modes"]:
        raise SimulationError(
            f"{where}.n_particles: need at least 16 particles per mode for developed speckle "
            f"({16 * out['n_modes']} for n_modes = {out['n_modes']}), got {out['n_particles']}"
        )
    out["pixels_per_cell"] = _integer(m, "pixels_per_cell", d["pixels_per_cell"], where, 2)
    out["photons_per_pixel"] = _number(
        m, "photons_per_pixel", d["photons_per_pixel"], where, **positive
    )
    out["ring_width"] = _number(m, "ring_width", d["ring_width"], where, maximum=1.0, **positive)
    out["sector_width_deg"] = _number(
        m, "sector_width_deg", d["sector_width_deg"], where, maximum=90.0, **positive
    )
    out["gap"] = _as_simulation_error(get_choice, m, "gap", d["gap"], GAPS, where)
    out["drift"] = _number(m, "drift", d["drift"], where, minimum=-1.0, maximum=1.0)
    dropped = m.get("dropped_frames", ())
    if isinstance(dropped, str | bytes | Mapping) or not hasattr(dropped, "__iter__"):
        raise SimulationError(f"{where}.dropped_frames: expected a list of frame indices")
    frames = []
    for k in dropped:
        if not isinstance(k, int | np.integer) or isinstance(k, bool):
            raise SimulationError(f"{where}.dropped_frames: expected integers, got {k!r}")
        if not 0 <= k < out["n_frames"]:
            raise SimulationError(
                f"{where}.dropped_frames: frame {k} is outside 0 .. {out['n_frames'] - 1}"
            )
        frames.append(int(k))
    out["dropped_frames"] = tuple(sorted(set(frames)))
    out["seed"] = _integer(m, "seed", d["seed"], where, 0)
    steps = _step_integrals(out["params"], out["dt"], out["n_frames"])[0]
    if np.any(steps < 0):
        k = int(np.argmax(steps < 0))
        raise SimulationError(
            f"{where}.params.D_offset: D(t) = D0 t^alpha + D_offset integrates to a negative "
            f"variance over frame step {k} -> {k + 1} ({steps[k]:g} Å²); raise D_offset"
        )
    return out


# ---------------------------------------------------------------------------------------
# Exact integrals of the power laws
# ---------------------------------------------------------------------------------------
def _exprel(x: np.ndarray) -> np.ndarray:
    """(e^x - 1)/x, continuous at 0."""
    x = np.asarray(x, dtype=np.float64)
    small = np.abs(x) < EXPREL_SERIES_BELOW
    safe = np.where(small, 1.0, x)
    return np.where(small, 1.0 + x / 2.0 + x * x / 6.0, np.expm1(safe) / safe)


def power_law_integral(t1: np.ndarray, t2: np.ndarray, a: float, eps: float) -> np.ndarray:
    """∫_{t1}^{t2} max(t, eps)^a dt exactly, for 0 <= t1 <= t2 (any real ``a``).

    Below ``eps`` the integrand is held at ``eps^a`` (the time floor); above it the
    antiderivative ``t^{a+1}/(a+1)`` is evaluated as ``lo^{a+1} ℓ exprel((a+1) ℓ)`` with
    ``ℓ = log1p((hi - lo)/lo)``, which is the ``log(hi/lo)`` limit at ``a = -1``.
    """
    t1 = np.asarray(t1, dtype=np.float64)
    t2 = np.asarray(t2, dtype=np.float64)
    flat = eps**a * (np.minimum(t2, eps) - np.minimum(t1, eps))
    lo = np.maximum(t1, eps)
    hi = np.maximum(t2, eps)
    ell = np.log1p((hi - lo) / lo)
    s = a + 1.0
    return flat + lo**s * ell * _exprel(s * ell)


def _step_integrals(
    params: Mapping[str, float], dt: float, n_frames: int
) -> tuple[np.ndarray, np.ndarray]:
    """(∫D, ∫γ̇) over each frame step k -> k+1, shape (n_frames - 1,) each."""
    t = dt * np.arange(n_frames, dtype=np.float64)
    eps = dt / 2.0
    t1, t2 = t[:-1], t[1:]
    d_steps = params["D0"] * power_law_integral(t1, t2, params["alpha"], eps)
    d_steps = d_steps + params["D_offset"] * (t2 - t1)
    if "gamma_dot_t0" in params:
        g_steps = params["gamma_dot_t0"] * power_law_integral(t1, t2, params["beta"], eps)
        g_steps = g_steps + params["gamma_dot_t_offset"] * (t2 - t1)
    else:
        g_steps = np.zeros_like(d_steps)
    return d_steps, g_steps


def cumulative_integrals(settings: SpeckleSettings) -> tuple[np.ndarray, np.ndarray]:
    """(I_D, I_γ): ``∫_0^{t_k}`` of D and γ̇ at each frame (exact, I[0] = 0), in Å² and 1."""
    d_steps, g_steps = _step_integrals(settings.params, settings.dt, settings.n_frames)
    zero = np.zeros(1)
    return np.concatenate([zero, np.cumsum(d_steps)]), np.concatenate([zero, np.cumsum(g_steps)])


# ---------------------------------------------------------------------------------------
# The simulation
# ---------------------------------------------------------------------------------------
def _trajectories(s: SpeckleSettings) -> tuple[np.ndarray, np.ndarray]:
    """Lateral positions x, z of every particle at every frame, (n_frames, N) float64."""
    rng = np.random.default_rng([s.seed, 0])
    n, big_n = s.n_frames, s.n_particles
    d_steps, g_steps = _step_integrals(s.params, s.dt, n)
    sigma = np.sqrt(d_steps)[:, None]
    box = s.box
    x0 = rng.uniform(0.0, box, big_n)
    z0 = rng.uniform(0.0, box, big_n)
    if s.gap == "uniform":
        y0 = rng.uniform(0.0, s.L, big_n)
    else:
        y0 = (s.L / math.pi) * (rng.uniform(size=big_n) + rng.uniform(size=big_n))
    kicks = sigma * rng.standard_normal((3, n - 1, big_n))
    # Heights at the start of each step (y diffuses too; see the module docstring).
    y_start = y0 + np.concatenate([np.zeros((1, big_n)), np.cumsum(kicks[1, :-1], axis=0)])
    step_x = kicks[0] + y_start * g_steps[:, None]
    x = np.concatenate([x0[None], x0 + np.cumsum(step_x, axis=0)])
    z = np.concatenate([z0[None], z0 + np.cumsum(kicks[2], axis=0)])
    return x, z


def _cell_intensity(
    s: SpeckleSettings, x: np.ndarray, z: np.ndarray, qx: np.ndarray, qz: np.ndarray
) -> np.ndarray:
    """Σ_modes |E_m|² at each frame and pixel, (n_frames, P), in units of particles."""
    n, big_n = x.shape
    n_pix = qx.size
    starts = np.concatenate([[0], np.cumsum(s.mode_sizes())[:-1]])
    qx32 = qx.astype(np.float32)[None, :, None]
    qz32 = qz.astype(np.float32)[None, :, None]
    chunk = max(1, min(REBASE_FRAMES, CHUNK_ELEMENTS // (n_pix * big_n)))
    out = np.empty((n, n_pix))
    phase = np.empty((chunk, n_pix, big_n), dtype=np.float32)
    two_pi = 2.0 * math.pi
    for r0 in range(0, n, REBASE_FRAMES):
        # Absolute phases (~1e6 rad) only in float64, reduced mod 2π at the block's first
        # frame; the motion within a block is small, so float32 carries it (fast trig).
        base = np.remainder(qx[:, None] * x[r0] + qz[:, None] * z[r0], two_pi)
        base = base.astype(np.float32)
        for k0 in range(r0, min(n, r0 + REBASE_FRAMES), chunk):
            k1 = min(n, k0 + chunk, r0 + REBASE_FRAMES)
            ph = phase[: k1 - k0]
            rel_x = (x[k0:k1] - x[r0]).astype(np.float32)[:, None, :]
            rel_z = (z[k0:k1] - z[r0]).astype(np.float32)[:, None, :]
            np.multiply(qx32, rel_x, out=ph)
            ph += base
            ph += qz32 * rel_z
            re = np.add.reduceat(np.cos(ph), starts, axis=-1).astype(np.float64)
            im = np.add.reduceat(np.sin(ph, out=ph), starts, axis=-1).astype(np.float64)
            out[k0:k1] = np.sum(re * re + im * im, axis=-1)
    return out


def pixel_vectors(s: SpeckleSettings, iq: int, iphi: int) -> tuple[np.ndarray, np.ndarray]:
    """|q_p| (1/Å) and φ_p (deg) of the pixels of cell (iq, iphi) (fixed by the seed)."""
    rng = np.random.default_rng([s.seed, 1, iq, iphi])
    u, v = rng.uniform(size=(2, s.pixels_per_cell))
    q_mag = s.q_centres[iq] * (1.0 + s.ring_width * (u - 0.5))
    phi = s.phi_centres[iphi] + s.sector_width_deg * (v - 0.5)
    return q_mag, phi


def drift_factor(s: SpeckleSettings) -> np.ndarray:
    """Relative mean intensity of each frame: a linear ramp centred on 1."""
    k = np.arange(s.n_frames)
    return 1.0 + s.drift * (k / (s.n_frames - 1) - 0.5)


def speckle_frames(settings: SpeckleSettings) -> dict[tuple[int, int], np.ndarray]:
    """Photon counts of every cell: (iq, iphi) -> (n_frames, pixels_per_cell) int64.

    The same particles scatter into every cell (one sample); each cell has its own
    pixels and Poisson draws. Dropped frames are all zero.
    """
    s = settings
    x, z = _trajectories(s)
    phi0 = s.params.get("phi0", 0.0)
    scale = s.photons_per_pixel * drift_factor(s)[:, None] / s.n_particles
    frames = {}
    for iq in range(len(s.q_centres)):
        for ip in range(len(s.phi_centres)):
            q_mag, phi = pixel_vectors(s, iq, ip)
            angle = np.deg2rad(phi0 - phi)
            intensity = _cell_intensity(s, x, z, q_mag * np.cos(angle), q_mag * np.sin(angle))
            rng = np.random.default_rng([s.seed, 2, iq, ip])
            counts = rng.poisson(scale * intensity)
            counts[list(s.dropped_frames)] = 0
            frames[(iq, ip)] = counts
    return frames


# ---------------------------------------------------------------------------------------
# The analytic expectation
# ---------------------------------------------------------------------------------------
def _sinc(x: np.ndarray) -> np.ndarray:
    """sin(x)/x (unnormalised)."""
    return np.sinc(np.asarray(x) / np.pi)


def _g1_squared(
    s: SpeckleSettings, q: float, phi: float, shear: str, i_d: np.ndarray, i_g: np.ndarray
) -> np.ndarray:
    """|g1(t1, t2)|² at one (|q|, φ), (n, n)."""
    d_int = np.abs(i_d[None, :] - i_d[:, None])
    g2 = np.exp(-(q * q) * d_int)
    if s.mode == LAMINAR_FLOW:
        gamma = np.abs(i_g[None, :] - i_g[:, None])
        cos_angle = math.cos(math.radians(s.params["phi0"] - phi))
        if shear == "physical":
            g2 = g2 * _sinc(0.5 * q * s.L * cos_angle * gamma) ** 2
        else:
            g2 = g2 * _sinc(q * s.L * cos_angle * gamma / (2.0 * math.pi)) ** 4
    return g2


def expected_c2(
    settings: SpeckleSettings,
    iq: int,
    iphi: int,
    shear: str = "physical",
    *,
    cell_average: bool = False,
    pixel_bias: bool = False,
) -> np.ndarray:
    """The analytic ensemble c2 of cell (iq, iphi): ``1 + β |g1|²``, (n_frames, n_frames).

    ``β`` is :attr:`SpeckleSettings.contrast` (≈ 1/n_modes). ``shear`` picks the field
    form: ``"physical"`` (``sinc²(Ψ)``, right for ``gap="uniform"``) or ``"homodyne"``
    (``sinc⁴(Φ)``, right for ``gap="triangular"``); static settings ignore it. With
    ``cell_average`` ``|g1|²`` is averaged over the cell's uniform spread of ``|q|`` and
    ``φ``; with ``pixel_bias`` the first-order ratio-estimator bias of a correlator over
    ``pixels_per_cell`` pixels is included (module docstring). The diagonal is the
    model's ``1 + β``: measured diagonals also carry the shot-noise excess 1/⟨n⟩.
    """
    s = settings
    if shear not in SHEAR_FORMS:
        raise SimulationError(f"shear: got {shear!r}; expected one of {list(SHEAR_FORMS)}")
    if not (0 <= iq < len(s.q_centres) and 0 <= iphi < len(s.phi_centres)):
        raise SimulationError(
            f"cell ({iq}, {iphi}) is outside the {len(s.q_centres)} × {len(s.phi_centres)} "
            "(ring, sector) partition"
        )
    i_d, i_g = cumulative_integrals(s)
    q, phi = s.q_centres[iq], s.phi_centres[iphi]
    if cell_average:
        nodes, weights = np.polynomial.legendre.leggauss(QUADRATURE_NODES)
        nodes, weights = 0.5 * nodes, 0.5 * weights  # on [-1/2, 1/2], summing to 1
        g2 = np.zeros((s.n_frames, s.n_frames))
        for du, wu in zip(nodes, weights, strict=True):
            for dv, wv in zip(nodes, weights, strict=True):
                q_node = q * (1.0 + s.ring_width * du)
                phi_node = phi + s.sector_width_deg * dv
                g2 += wu * wv * _g1_squared(s, q_node, phi_node, shear, i_d, i_g)
    else:
        g2 = _g1_squared(s, q, phi, shear, i_d, i_g)
    beta = s.contrast
    c = beta * g2
    if pixel_bias:
        c = c * (1.0 - (1.0 + 2.0 * beta - c) / s.pixels_per_cell)
        np.fill_diagonal(c, beta * np.diagonal(g2))
    return 1.0 + c


def speckle_mapping(m: Mapping[str, Any], where: str = "simulate") -> dict[str, Any]:
    """The speckle simulator's settings of a workflow simulate entry ``{method: speckle,
    speckle: {...}}`` (:class:`SpeckleSettings` keys)."""
    other = sorted(set(m) - {"method", "speckle", "format"})
    if other:
        raise SimulationError(
            f"{where}.{other[0]}: not a setting of the speckle simulator; with method: "
            "speckle its settings go under 'speckle:'"
        )
    speckle = m.get("speckle") or {}
    if not isinstance(speckle, Mapping):
        raise SimulationError(f"{where}.speckle: expected a mapping, got {speckle!r}")
    return dict(speckle)
