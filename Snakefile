# homodyne-steps: XPCS homodyne analysis under flow as a workflow of cached stages.
# Run from the repository root:  snakemake --cores 2
from snakemake.utils import min_version, validate

from homodyne_steps.wfconfig import check_config_file, stop_on_config_error

min_version("9.0")

# A YAML syntax error is reported with its file, line and column (Snakemake's is not).
stop_on_config_error(check_config_file, "config/config.yaml", missing_ok=True)


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/nlsq.smk"
include: "workflow/rules/cmc.smk"
include: "workflow/rules/plots.smk"


report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        expand("results/{dataset}/data/qc_report.json", dataset=DATASETS),
        expand("results/{dataset}/nlsq/parameters.json", dataset=DATASETS),
        expand("results/{dataset}/cmc/parameters.json", dataset=DATASETS),
        expand(
            "results/{dataset}/plots/{kind}/figures.json",
            dataset=DATASETS,
            kind=("data", "qc", "nlsq", "cmc"),
        ),
        "results/summary.csv",
        "results/summary.json",
