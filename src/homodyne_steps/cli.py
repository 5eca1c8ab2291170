"""The ``homodyne-steps`` command line: one subcommand per stage.

Heavy modules (JAX, h5py) are imported inside each subcommand, so ``--help`` and the
Snakefile's imports stay fast. Errors caused by input are printed as one clear line and
exit with status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from homodyne_steps import __version__
from homodyne_steps.errors import HomodyneStepsError
from homodyne_steps.physics.registry import REGISTRY


def _run_simulate(args: argparse.Namespace) -> int:
    # the options' defaults shape what is simulated: simulate's fingerprint includes them
    from homodyne_steps import cli_simulate  # noqa: F401
    from homodyne_steps.physics.model_settings import ModelSettings
    from homodyne_steps.physics.reference import REFERENCE_CASES
    from homodyne_steps.physics.registry import canonical_mode
    from homodyne_steps.physics.speckle import speckle_mapping
    from homodyne_steps.settings import parse_settings_json
    from homodyne_steps.stages.simulate import SimulationSettings, settings_from_mapping

    if args.method == "speckle":
        return _simulate_speckle(args, parse_settings_json(args.settings or "{}", "simulate"))
    if args.settings is not None:
        mapping = parse_settings_json(args.settings, "simulate")
        if mapping.get("method") == "speckle":  # a workflow simulate entry
            return _simulate_speckle(args, speckle_mapping(mapping))
        settings = settings_from_mapping(mapping)
        return _simulate_and_report(settings, args)
    mode = canonical_mode(args.mode)
    case = REFERENCE_CASES[mode]
    params = dict(case["params"])
    for name, value in args.param:
        if name not in params:
            raise HomodyneStepsError(
                f"--param {name}: not a physical parameter of {mode} mode ({', '.join(params)})"
            )
        params[name] = value

    def one_or_many(values: list[float]) -> float | list[float]:
        return values[0] if len(values) == 1 else values

    settings = SimulationSettings(
        params=params,
        phi_deg=tuple(args.phi) if args.phi else case["phi_deg"],
        q=args.q,
        L=args.L,
        dt=args.dt,
        n_frames=args.frames if args.frames is not None else case["n_frames"],
        contrast=one_or_many(args.contrast),
        offset=one_or_many(args.offset),
        noise=args.noise,
        diagonal_excess=args.diagonal_excess,
        n_q_rings=args.q_rings,
        q_ring_step=args.q_ring_step,
        empty_cells=tuple(args.empty_cell),
        avg_frames=args.avg_frames,
        stride_frames=args.stride_frames,
        seed=args.seed,
        model=ModelSettings(shear=args.shear, integral=args.integral),
    )
    return _simulate_and_report(settings, args)


def _simulate_speckle(args: argparse.Namespace, mapping: dict) -> int:
    """The speckle simulator on ``mapping`` (:class:`SpeckleSettings` keys)."""
    from homodyne_steps.physics.speckle import SpeckleSettings
    from homodyne_steps.stages.simulate import write_simulation
    from homodyne_steps.stages.simulate_speckle import speckle_bins

    start = time.perf_counter()
    settings = SpeckleSettings.from_mapping(mapping, "simulate.speckle")
    bins, truth = speckle_bins(settings)
    out, truth_path = write_simulation(
        bins, truth, args.out, fmt=args.format, truth_path=args.truth
    )
    print(f"wrote {out} ({args.format}, speckle) and {truth_path} in "
          f"{time.perf_counter() - start:.2f} s")  # fmt: skip
    return 0


def _simulate_and_report(settings, args: argparse.Namespace) -> int:
    from homodyne_steps.stages.simulate import simulate_file

    start = time.perf_counter()
    out, truth = simulate_file(settings, args.out, fmt=args.format, truth_path=args.truth)
    print(f"wrote {out} ({args.format}) and {truth} in {time.perf_counter() - start:.2f} s")
    return 0


def _stage_parser(sub, name: str, help_text: str, inputs: dict[str, str], outputs: dict[str, str]):
    p = sub.add_parser(name, help=help_text, description=help_text)
    for flag, text in {**inputs, **outputs}.items():
        p.add_argument(f"--{flag}", required=True, help=text)
    p.add_argument(
        "--settings", default="{}", metavar="JSON", help="the stage's settings as a JSON object"
    )
    return p


def _add_data_stages(sub: argparse._SubParsersAction) -> None:
    _stage_parser(
        sub,
        "load",
        "read an APS two-time HDF5 file at one q (both layouts)",
        {"input": "APS HDF5 result file"},
        {"out-npz": "loaded.npz to write", "out-json": "loaded.json record to write"},
    ).set_defaults(func=_run_load)
    _stage_parser(
        sub,
        "filter",
        "select angle bins and frames; record what was dropped and why",
        {"input": "loaded.npz"},
        {"out-npz": "filtered.npz to write", "out-json": "filter report JSON to write"},
    ).set_defaults(func=_run_filter)
    _stage_parser(
        sub,
        "preprocess",
        "diagonal correction, optional normalisation and noise reduction",
        {"input": "filtered.npz"},
        {"out-npz": "preprocessed.npz to write", "out-json": "provenance.json to write"},
    ).set_defaults(func=_run_preprocess)
    _stage_parser(
        sub,
        "qc",
        "score the data at four checkpoints, repair what can be repaired",
        {"raw": "loaded.npz", "filtered": "filtered.npz", "preprocessed": "preprocessed.npz"},
        {"out-json": "qc_report.json to write", "out-npz": "QC'd data to write"},
    ).set_defaults(func=_run_qc)
    p = sub.add_parser(
        "nlsq",
        help="bounded least-squares fit of the model to QC'd data",
        description="Fit the homodyne model to QC'd data (upper triangle, data-derived σ); "
        "writes parameters.json, analysis_results_nlsq.json, convergence_metrics.json and "
        "fitted_data.npz into --out-dir.",
    )
    p.add_argument("--input", required=True, help="QC'd data (qc.npz)")
    p.add_argument("--out-dir", required=True, help="directory for the four output files")
    p.add_argument(
        "--settings",
        default="{}",
        metavar="JSON",
        help="JSON object with analysis_mode, L, parameters (registry overrides) "
        "and nlsq (the stage's settings)",
    )
    p.set_defaults(func=_run_nlsq)
    _add_cmc_stages(sub)


def _run_load(args: argparse.Namespace) -> int:
    from homodyne_steps.settings import parse_settings_json
    from homodyne_steps.stages.load import LoadSettings, load_stage

    s = LoadSettings.from_mapping(parse_settings_json(args.settings, "load"))
    data = load_stage(args.input, s.q, args.out_npz, args.out_json, **s.read_options())
    print(f"loaded {data.n_phi} angles x {data.n_t} frames at q = {data.q:.6g} 1/Å")
    return 0


def _run_filter(args: argparse.Namespace) -> int:
    from homodyne_steps.settings import parse_settings_json
    from homodyne_steps.stages.filter import FilterSettings, filter_stage

    settings = FilterSettings.from_mapping(parse_settings_json(args.settings, "filter"))
    out = filter_stage(args.input, args.out_npz, args.out_json, settings)
    print(f"kept {out.n_phi} angles x {out.n_t} frames")
    return 0


def _run_preprocess(args: argparse.Namespace) -> int:
    from homodyne_steps.data.preprocess_settings import PreprocessSettings
    from homodyne_steps.settings import parse_settings_json
    from homodyne_steps.stages.preprocess import preprocess_stage

    settings = PreprocessSettings.from_mapping(parse_settings_json(args.settings, "preprocess"))
    preprocess_stage(args.input, args.out_npz, args.out_json, settings)
    print(f"wrote {args.out_npz} and {args.out_json}")
    return 0


def _run_qc(args: argparse.Namespace) -> int:
    from homodyne_steps.data.qc_settings import QcSettings
    from homodyne_steps.settings import parse_settings_json
    from homodyne_steps.stages.qc import qc_stage

    settings = QcSettings.from_mapping(parse_settings_json(args.settings, "qc"))
    report = qc_stage(
        args.raw, args.filtered, args.preprocessed, args.out_json, args.out_npz, settings
    )
    overall = report["overall"]
    print(f"QC {overall['status']}: score {overall['score']:.1f} ({overall['label']})")
    return 0


def _run_nlsq(args: argparse.Namespace) -> int:
    from homodyne_steps.inference.nlsq_settings import NlsqSettings
    from homodyne_steps.physics.model_settings import ModelSettings
    from homodyne_steps.stages.nlsq_stage import nlsq_stage

    s = _job_settings(args.settings, "nlsq", {"analysis_mode", "L", "parameters", "nlsq", "model"})
    settings = NlsqSettings.from_mapping(s.get("nlsq"))
    out = nlsq_stage(
        args.input,
        args.out_dir,
        mode=s["analysis_mode"],
        L=s["L"],
        settings=settings,
        parameter_overrides=s.get("parameters"),
        model=ModelSettings.from_mapping(s.get("model")),
    )
    r = out.result
    print(
        f"NLSQ {r.status} ({r.reason}) in {r.iterations} iterations, "
        f"reduced chi2 = {r.reduced_chi_squared:.4f}"
    )
    for name, value, unc in zip(out.names, r.physical, out.uncertainties, strict=True):
        print(f"  {name:20s} {value:12.6g} ± {unc:.3g}")
    return 0


def _add_cmc_stages(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cmc-plan", help="CMC: decide the shards and which points each holds")
    p.add_argument("--input", required=True, help="QC'd data (qc.npz)")
    p.add_argument("--out-json", required=True, help="plan.json (decisions and reasons)")
    p.add_argument("--out-npz", required=True, help="plan.npz (point ids of every shard)")
    p.add_argument(
        "--settings",
        default="{}",
        metavar="JSON",
        help="JSON with analysis_mode, per_angle_scaling, sharding, sampling_coordinates",
    )
    p.set_defaults(func=_run_cmc_plan)
    p = sub.add_parser("cmc-shard", help="CMC: NUTS on one shard")
    p.add_argument("--input", required=True, help="QC'd data (qc.npz)")
    p.add_argument("--plan", required=True, help="plan.npz")
    _add_nlsq_inputs(p, "parameters", "fitted")
    p.add_argument("--shard", required=True, type=int, help="shard index (0-based)")
    p.add_argument("--out-nc", required=True, help="InferenceData (netCDF) to write")
    p.add_argument("--out-json", required=True, help="shard record to write")
    p.add_argument(
        "--settings",
        default="{}",
        metavar="JSON",
        help="JSON with analysis_mode, L, parameters, sampler, prior",
    )
    p.set_defaults(func=_run_cmc_shard)
    p = sub.add_parser("cmc-combine", help="CMC: combine shard posteriors, diagnose, write")
    p.add_argument("--input", required=True, help="QC'd data (qc.npz)")
    p.add_argument("--shards", required=True, nargs="+", help="shard .nc files (records beside)")
    _add_nlsq_inputs(p, "parameters", "fitted")
    p.add_argument("--out-dir", required=True, help="directory for the CMC outputs")
    p.add_argument(
        "--settings", default="{}", metavar="JSON", help="JSON with analysis_mode, L and combine"
    )
    p.set_defaults(func=_run_cmc_combine)


def _add_nlsq_inputs(p: argparse.ArgumentParser, *files: str) -> None:
    """Options naming the NLSQ outputs a job reads: each file exactly (as the workflow's
    rules do), or ``--nlsq-dir`` for all of them by their usual names."""
    from homodyne_steps.io.nlsq_files import NlsqFiles

    for name in files:
        p.add_argument(f"--nlsq-{name}", help=f"the NLSQ {NlsqFiles.NAMES[name]}")
    listed = ", ".join(NlsqFiles.NAMES[name] for name in files)
    p.add_argument("--nlsq-dir", help=f"instead: the NLSQ output folder (its {listed})")


def _nlsq_inputs(args: argparse.Namespace, *files: str) -> dict[str, Path]:
    from homodyne_steps.io.nlsq_files import NlsqFiles

    out = {}
    for name in files:
        given = getattr(args, f"nlsq_{name}")
        if given is None and args.nlsq_dir is None:
            raise HomodyneStepsError(f"{args.command}: give --nlsq-{name} (or --nlsq-dir)")
        out[name] = Path(given) if given else Path(args.nlsq_dir) / NlsqFiles.NAMES[name]
    return out


def _job_settings(text: str, stage: str, keys: set[str]) -> dict:
    """The one parser of a fit job's ``--settings`` (nlsq, cmc-plan, cmc-shard,
    cmc-combine): known keys only, the analysis mode required, L required in laminar
    flow (1.0 in static modes, where it is never used)."""
    from homodyne_steps.physics.registry import canonical_mode
    from homodyne_steps.settings import check_keys, parse_settings_json

    s = parse_settings_json(text, stage)
    check_keys(s, keys, f"{stage} job")
    if "analysis_mode" not in s:
        raise HomodyneStepsError(f"{stage}: the dataset's analysis_mode is required")
    if "L" in keys and s.get("L") is None:
        if canonical_mode(s["analysis_mode"]) == "laminar_flow":
            raise HomodyneStepsError(f"{stage}: laminar_flow needs the gap L (Å) of the dataset")
        s["L"] = 1.0  # static mode never uses L
    return s


def _run_cmc_plan(args: argparse.Namespace) -> int:
    from homodyne_steps.physics.coordinates import DEFAULT_COORDINATES
    from homodyne_steps.physics.scaling import DEFAULT_MODE
    from homodyne_steps.stages.cmc_plan import ShardingSettings, cmc_plan_stage

    s = _job_settings(
        args.settings,
        "cmc-plan",
        {"analysis_mode", "per_angle_scaling", "sharding", "sampling_coordinates"},
    )
    rec = cmc_plan_stage(
        args.input,
        args.out_json,
        args.out_npz,
        mode=s["analysis_mode"],
        scaling_mode=s.get("per_angle_scaling", DEFAULT_MODE),
        settings=ShardingSettings.from_mapping(s.get("sharding")),
        sampling_coordinates=s.get("sampling_coordinates", DEFAULT_COORDINATES),
    )
    print(f"{rec.num_shards} shards: {rec.decisions[0].reason}")
    return 0


def _run_cmc_shard(args: argparse.Namespace) -> int:
    from homodyne_steps.inference.cmc_shard_settings import PriorSettings, SamplerSettings
    from homodyne_steps.physics.model_settings import ModelSettings
    from homodyne_steps.stages.cmc_shard import cmc_shard_stage

    s = _job_settings(
        args.settings,
        "cmc-shard",
        {"analysis_mode", "L", "model", "parameters", "sampler", "prior"},
    )
    nlsq = _nlsq_inputs(args, "parameters", "fitted")
    rec = cmc_shard_stage(
        args.input,
        args.plan,
        nlsq["parameters"],
        nlsq["fitted"],
        args.shard,
        args.out_nc,
        args.out_json,
        mode=s["analysis_mode"],
        L=s["L"],
        sampler=SamplerSettings.from_mapping(s.get("sampler")),
        prior=PriorSettings.from_mapping(s.get("prior")),
        parameter_overrides=s.get("parameters"),
        model=ModelSettings.from_mapping(s.get("model")),
    )
    t = rec["timings"]
    print(
        f"shard {args.shard}: {rec['n_points']} points, {rec['divergences']} divergences, "
        f"compile+warmup {t['compile_and_warmup_s']:.1f} s, sampling {t['sampling_s']:.1f} s"
    )
    return 0


def _run_cmc_combine(args: argparse.Namespace) -> int:
    from homodyne_steps.inference.cmc_fitted import FittedInputs
    from homodyne_steps.physics.model_settings import ModelSettings
    from homodyne_steps.stages.cmc_combine import CombineSettings, combine_stage

    s = _job_settings(args.settings, "cmc-combine", {"analysis_mode", "L", "model", "combine"})
    model = ModelSettings.from_mapping(s.get("model"))
    nlsq = _nlsq_inputs(args, "parameters", "fitted")
    shards = [Path(p) for p in args.shards]
    out = combine_stage(
        shards,
        [p.with_suffix(".json") for p in shards],
        args.out_dir,
        CombineSettings.from_mapping(s.get("combine")),
        nlsq_parameters=nlsq["parameters"],
        fitted=FittedInputs(args.input, nlsq["fitted"], s["analysis_mode"], s["L"], model),
    )
    print(f"CMC {out.status}: {len(out.kept)} shards kept, {len(out.excluded)} excluded")
    return 0


def _add_plot_stages(sub: argparse._SubParsersAction) -> None:
    settings_help = "the plot settings as a JSON object (dpi, max_pixels, max_shards)"
    p = sub.add_parser("plot-data", help="figures of the data before and after preprocessing")
    p.add_argument("--filtered", required=True, help="data before preprocessing (filtered.npz)")
    p.add_argument("--preprocessed", required=True, help="data after it (preprocessed.npz)")
    p.add_argument("--out-dir", required=True, help="directory for the PNGs and figures.json")
    p.add_argument("--settings", default="{}", metavar="JSON", help=settings_help)
    p.set_defaults(func=_run_plot_data)
    p = sub.add_parser("plot-qc", help="one-page QC summary of a dataset")
    p.add_argument("--input", required=True, help="qc_report.json")
    p.add_argument("--out-dir", required=True, help="directory for the PNG and figures.json")
    p.add_argument("--dataset", help="dataset name shown in the title")
    p.add_argument("--settings", default="{}", metavar="JSON", help=settings_help)
    p.set_defaults(func=_run_plot_qc)
    p = sub.add_parser("plot-nlsq", help="figures of the NLSQ fit (heatmaps, g2, residuals, D(t))")
    _add_nlsq_inputs(p, "parameters", "analysis", "fitted")
    p.add_argument("--out-dir", required=True, help="directory for the PNGs and figures.json")
    p.add_argument("--settings", default="{}", metavar="JSON", help=settings_help)
    p.set_defaults(func=_run_plot_nlsq)
    p = sub.add_parser("plot-cmc", help="ArviZ figures of the CMC posterior and its shards")
    p.add_argument("--cmc-dir", required=True, help="the dataset's CMC output directory")
    p.add_argument("--shards", required=True, nargs="+", help="shard .nc files")
    _add_nlsq_inputs(p, "parameters")  # optional: the NLSQ values are overlaid
    p.add_argument("--out-dir", required=True, help="directory for the PNGs and figures.json")
    p.add_argument("--settings", default="{}", metavar="JSON", help=settings_help)
    p.set_defaults(func=_run_plot_cmc)
    p = sub.add_parser(
        "write",
        help="collect every dataset's results into summary.csv and summary.json",
        description="One row per dataset: mode, NLSQ values ± uncertainties, CMC mean ± sd "
        "and HDI, reduced χ², R-hat/ESS, QC score, quality flags and output paths. Reads "
        "only the datasets' JSON records under --results-dir/{dataset}/.",
    )
    p.add_argument("--results-dir", required=True, help="directory holding {dataset}/ results")
    p.add_argument("--datasets", required=True, nargs="+", help="dataset names (one row each)")
    p.add_argument("--out-csv", required=True, help="summary.csv to write")
    p.add_argument("--out-json", required=True, help="summary.json to write")
    p.set_defaults(func=_run_write)


def _plot_settings(text: str, stage: str):
    from homodyne_steps.plots.plot_common import PlotSettings
    from homodyne_steps.settings import parse_settings_json

    return PlotSettings.from_mapping(parse_settings_json(text, stage))


def _report_figures(index: dict, out_dir: str) -> int:
    print(f"wrote {len(index['figures'])} figures into {out_dir}")
    return 0


def _run_plot_data(args: argparse.Namespace) -> int:
    from homodyne_steps.plots.plot_data import plot_data_stage

    s = _plot_settings(args.settings, "plot")
    index = plot_data_stage(args.filtered, args.preprocessed, args.out_dir, s)
    return _report_figures(index, args.out_dir)


def _run_plot_qc(args: argparse.Namespace) -> int:
    from homodyne_steps.plots.plot_qc import plot_qc_stage

    s = _plot_settings(args.settings, "plot")
    index = plot_qc_stage(args.input, args.out_dir, s, dataset=args.dataset)
    return _report_figures(index, args.out_dir)


def _run_plot_nlsq(args: argparse.Namespace) -> int:
    from homodyne_steps.io.nlsq_files import NlsqFiles
    from homodyne_steps.plots.plot_nlsq import plot_nlsq_stage

    s = _plot_settings(args.settings, "plot")
    nlsq = NlsqFiles(**_nlsq_inputs(args, "parameters", "analysis", "fitted"))
    return _report_figures(plot_nlsq_stage(nlsq, args.out_dir, s), args.out_dir)


def _run_plot_cmc(args: argparse.Namespace) -> int:
    from homodyne_steps.plots.plot_cmc import plot_cmc_stage

    s = _plot_settings(args.settings, "plot")
    given = args.nlsq_parameters or args.nlsq_dir
    nlsq = _nlsq_inputs(args, "parameters")["parameters"] if given else None
    index = plot_cmc_stage(args.cmc_dir, args.shards, args.out_dir, s, nlsq_parameters=nlsq)
    return _report_figures(index, args.out_dir)


def _run_write(args: argparse.Namespace) -> int:
    from homodyne_steps.stages.write import write_stage

    rows = write_stage(args.results_dir, args.datasets, args.out_csv, args.out_json)
    print(f"wrote {len(rows)} rows to {args.out_csv} and {args.out_json}")
    return 0


def _add_params(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="print the parameter registry")
    p.add_argument("--format", choices=["markdown", "json"], default="markdown")
    p.set_defaults(func=_run_params)


def _run_params(args: argparse.Namespace) -> int:
    if args.format == "markdown":
        print(REGISTRY.markdown_table())
    else:
        import json
        from dataclasses import asdict

        print(json.dumps([asdict(s) for s in REGISTRY], indent=2, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    # imported here, not at the top: only simulate's fingerprint holds it (_run_simulate)
    from homodyne_steps.cli_simulate import add_simulate

    parser = argparse.ArgumentParser(
        prog="homodyne-steps",
        description="XPCS homodyne analysis under flow, one stage per subcommand.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU cores this process may use (pins the CPU affinity before JAX starts: "
        "XLA sizes its thread pool from it)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    add_simulate(sub, _run_simulate)
    _add_data_stages(sub)
    _add_plot_stages(sub)
    _add_params(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 2 inside argparse
    if args.threads is not None:
        from homodyne_steps.cpu_pinning import pin_threads

        pin_threads(args.threads)
    try:
        return args.func(args)
    except HomodyneStepsError as exc:
        print(f"homodyne-steps {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable results/, full disk, a file where a folder is...
        where = exc.filename or "a file"
        reason = exc.strerror or str(exc)
        print(f"homodyne-steps {args.command}: error: {where}: {reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
