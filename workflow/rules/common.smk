# Shared setup: config validation and the per-rule config slices.
# Only light package modules are imported here (no JAX): the workflow parses fast.
import re

from homodyne_steps.io.cmc_files import CmcPlan
from homodyne_steps.wfconfig import (
    check_stage_settings,
    code_fingerprint,
    dataset_names,
    stage_settings,
    stage_slice,
    stop_on_config_error,
    validate_config,
)

# Our validator names every bad key by its full path; Snakemake's then records the
# schema for the report.
SCHEMA = workflow.source_path("../schemas/config.schema.yaml")
stop_on_config_error(validate_config, config, SCHEMA)
validate(config, "../schemas/config.schema.yaml", set_default=False)
# ... then builds every stage's typed settings once, as the jobs will (wfconfig).
stop_on_config_error(check_stage_settings, config)

DATASETS = dataset_names(config)
SIMULATED = sorted(config.get("simulate", {}))
ENV = "../../envs/homodyne-steps.yaml"


wildcard_constraints:
    dataset="|".join(map(re.escape, DATASETS)) if DATASETS else "(?!)",
    simulated="|".join(map(re.escape, SIMULATED)) if SIMULATED else "(?!)",


def dataset_file(wildcards):
    return config["datasets"][wildcards.dataset]["file"]


def settings_of(stage):
    """Params function: the JSON slice of the config that one stage of a dataset sees."""
    return lambda wildcards: stage_settings(config, stage, wildcards.dataset)


def cmc_resource(name, default):
    return lambda wildcards: stage_slice(config, "cmc_resources", wildcards.dataset).get(
        name, default
    )


def cmc_shard_files(wildcards, ext="nc"):
    plan = checkpoints.cmc_plan.get(dataset=wildcards.dataset).output.plan
    n = CmcPlan.read(plan).num_shards
    return expand(
        "results/{dataset}/cmc/K{n}/shards/{k}.{ext}",
        dataset=wildcards.dataset,
        n=n,
        k=range(n),
        ext=ext,
    )


# The report entries of the plot rules (plots.smk).
PLOT_CATEGORY = {
    "data": "1. Data",
    "qc": "2. Quality control",
    "nlsq": "3. NLSQ fit",
    "cmc": "4. CMC posterior",
}


def figure(kind, name):
    """One figure of a plot rule, in the report with its caption plot_{kind}_{name}.rst."""
    return report(
        f"results/{{dataset}}/plots/{kind}/{name}.png",
        caption=f"../report/plot_{kind}_{name}.rst",
        category=PLOT_CATEGORY[kind],
        subcategory="{dataset}",
        labels={"dataset": "{dataset}", "figure": name},
    )


def angle_figures(kind):
    """The folder of a plot rule's per-angle figures (plot_{kind}_angles.rst)."""
    return report(
        directory(f"results/{{dataset}}/plots/{kind}/angles"),
        patterns=["{name}.png"],
        caption=f"../report/plot_{kind}_angles.rst",
        category=PLOT_CATEGORY[kind],
        subcategory="{dataset}",
        labels={"dataset": "{dataset}", "figure": "{name}"},
    )
