# Figures and the summary table. Each plot rule names every file it writes: its index
# figures.json, each figure whose name is fixed, and the folder angles/ of the figures
# drawn once per angle (their number follows the data). The Snakemake report picks them
# up (snakemake --report report.html), each with its caption in workflow/report/
# (figure() and angle_figures() are in common.smk).
# Data, QC and NLSQ plots do not depend on CMC outputs, so they run beside the shards.
rule plot_data:
    input:
        filtered="results/{dataset}/data/filtered.npz",
        preprocessed="results/{dataset}/data/preprocessed.npz",
    output:
        index="results/{dataset}/plots/data/figures.json",
        angles=angle_figures("data"),
        g2=figure("data", "g2_vs_lag"),
    log:
        "logs/{dataset}/plot_data.log",
    conda:
        ENV
    params:
        settings=settings_of("plot_data"),
        code=code_fingerprint("plot_data"),
        out_dir=subpath(output.index, parent=True),
    shell:
        "homodyne-steps plot-data --filtered {input.filtered:q} "
        "--preprocessed {input.preprocessed:q} --out-dir {params.out_dir:q} "
        "--settings {params.settings:q} > {log:q} 2>&1"


rule plot_qc:
    input:
        "results/{dataset}/data/qc_report.json",
    output:
        index="results/{dataset}/plots/qc/figures.json",
        summary=figure("qc", "qc_summary"),
    log:
        "logs/{dataset}/plot_qc.log",
    conda:
        ENV
    params:
        settings=settings_of("plot_qc"),
        code=code_fingerprint("plot_qc"),
        out_dir=subpath(output.index, parent=True),
    shell:
        "homodyne-steps plot-qc --input {input:q} --dataset {wildcards.dataset} "
        "--out-dir {params.out_dir:q} --settings {params.settings:q} > {log:q} 2>&1"


rule plot_nlsq:
    input:
        parameters="results/{dataset}/nlsq/parameters.json",
        analysis="results/{dataset}/nlsq/analysis_results_nlsq.json",
        fitted="results/{dataset}/nlsq/fitted_data.npz",
    output:
        index="results/{dataset}/plots/nlsq/figures.json",
        angles=angle_figures("nlsq"),
        g2=figure("nlsq", "g2_fit_vs_lag"),
        residuals=figure("nlsq", "residual_histogram"),
        transport=figure("nlsq", "transport_coefficients"),
    log:
        "logs/{dataset}/plot_nlsq.log",
    conda:
        ENV
    params:
        settings=settings_of("plot_nlsq"),
        code=code_fingerprint("plot_nlsq"),
        out_dir=subpath(output.index, parent=True),
    shell:
        "homodyne-steps plot-nlsq --nlsq-parameters {input.parameters:q} "
        "--nlsq-analysis {input.analysis:q} --nlsq-fitted {input.fitted:q} "
        "--out-dir {params.out_dir:q} --settings {params.settings:q} > {log:q} 2>&1"


rule plot_cmc:
    input:
        shards=cmc_shard_files,
        posterior="results/{dataset}/cmc/posterior.nc",
        parameters="results/{dataset}/cmc/parameters.json",
        report="results/{dataset}/cmc/combination_report.json",
        nlsq="results/{dataset}/nlsq/parameters.json",
    output:
        index="results/{dataset}/plots/cmc/figures.json",
        trace=figure("cmc", "trace"),
        rank=figure("cmc", "rank"),
        pair=figure("cmc", "pair"),
        forest=figure("cmc", "forest"),
        energy=figure("cmc", "energy"),
        ess=figure("cmc", "ess"),
        shards=figure("cmc", "shard_posteriors"),
    log:
        "logs/{dataset}/plot_cmc.log",
    conda:
        ENV
    params:
        settings=settings_of("plot_cmc"),
        code=code_fingerprint("plot_cmc"),
        cmc_dir=subpath(input.parameters, parent=True),
        out_dir=subpath(output.index, parent=True),
    shell:
        "homodyne-steps plot-cmc --cmc-dir {params.cmc_dir:q} --shards {input.shards:q} "
        "--nlsq-parameters {input.nlsq:q} --out-dir {params.out_dir:q} "
        "--settings {params.settings:q} > {log:q} 2>&1"


# Across datasets: one row per dataset from its JSON records only. Adding a dataset
# reruns this rule and the new dataset's stages, nothing of the other datasets.
rule write:
    input:
        loaded=expand("results/{dataset}/data/loaded.json", dataset=DATASETS),
        qc=expand("results/{dataset}/data/qc_report.json", dataset=DATASETS),
        nlsq=expand("results/{dataset}/nlsq/parameters.json", dataset=DATASETS),
        nlsq_analysis=expand("results/{dataset}/nlsq/analysis_results_nlsq.json", dataset=DATASETS),
        cmc=expand("results/{dataset}/cmc/parameters.json", dataset=DATASETS),
        cmc_analysis=expand("results/{dataset}/cmc/analysis_results_cmc.json", dataset=DATASETS),
        cmc_report=expand("results/{dataset}/cmc/combination_report.json", dataset=DATASETS),
    output:
        csv=report(
            "results/summary.csv",
            caption="../report/summary.rst",
            category="0. Summary",
            labels={"table": "summary.csv"},
        ),
        json="results/summary.json",
    log:
        "logs/write.log",
    conda:
        ENV
    params:
        datasets=DATASETS,
        code=code_fingerprint("write"),
    shell:
        "homodyne-steps write --results-dir results --datasets {params.datasets:q} "
        "--out-csv {output.csv:q} --out-json {output.json:q} > {log:q} 2>&1"
