# Figures and the summary table. Each plot rule writes one folder of PNGs (plus
# figures.json) that the Snakemake report picks up (snakemake --report report.html).
# Data, QC and NLSQ plots do not depend on CMC outputs, so they run beside the shards.


rule plot_data:
    input:
        filtered="results/{dataset}/data/filtered.npz",
        preprocessed="results/{dataset}/data/preprocessed.npz",
    output:
        report(
            directory("results/{dataset}/plots/data"),
            patterns=["{name}.png"],
            caption="../report/plot_data.rst",
            category="1. Data",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "{name}"},
        ),
    log:
        "logs/{dataset}/plot_data.log",
    conda:
        ENV
    params:
        settings=settings_of("plot_data"),
        code=code_fingerprint("plot_data"),
    shell:
        "homodyne-steps plot-data --filtered {input.filtered:q} "
        "--preprocessed {input.preprocessed:q} --out-dir {output:q} "
        "--settings {params.settings:q} > {log:q} 2>&1"


rule plot_qc:
    input:
        "results/{dataset}/data/qc_report.json",
    output:
        report(
            directory("results/{dataset}/plots/qc"),
            patterns=["{name}.png"],
            caption="../report/plot_qc.rst",
            category="2. Quality control",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "{name}"},
        ),
    log:
        "logs/{dataset}/plot_qc.log",
    conda:
        ENV
    params:
        settings=settings_of("plot_qc"),
        code=code_fingerprint("plot_qc"),
    shell:
        "homodyne-steps plot-qc --input {input:q} --dataset {wildcards.dataset} "
        "--out-dir {output:q} --settings {params.settings:q} > {log:q} 2>&1"


rule plot_nlsq:
    input:
        parameters="results/{dataset}/nlsq/parameters.json",
        analysis="results/{dataset}/nlsq/analysis_results_nlsq.json",
        fitted="results/{dataset}/nlsq/fitted_data.npz",
    output:
        report(
            directory("results/{dataset}/plots/nlsq"),
            patterns=["{name}.png"],
            caption="../report/plot_nlsq.rst",
            category="3. NLSQ fit",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "{name}"},
        ),
    log:
        "logs/{dataset}/plot_nlsq.log",
    conda:
        ENV
    params:
        settings=settings_of("plot_nlsq"),
        code=code_fingerprint("plot_nlsq"),
    shell:
        "homodyne-steps plot-nlsq --nlsq-parameters {input.parameters:q} "
        "--nlsq-analysis {input.analysis:q} --nlsq-fitted {input.fitted:q} "
        "--out-dir {output:q} --settings {params.settings:q} > {log:q} 2>&1"


rule plot_cmc:
    input:
        shards=cmc_shard_files,
        posterior="results/{dataset}/cmc/posterior.nc",
        parameters="results/{dataset}/cmc/parameters.json",
        report="results/{dataset}/cmc/combination_report.json",
        nlsq="results/{dataset}/nlsq/parameters.json",
    output:
        report(
            directory("results/{dataset}/plots/cmc"),
            patterns=["{name}.png"],
            caption="../report/plot_cmc.rst",
            category="4. CMC posterior",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "figure": "{name}"},
        ),
    log:
        "logs/{dataset}/plot_cmc.log",
    conda:
        ENV
    params:
        settings=settings_of("plot_cmc"),
        code=code_fingerprint("plot_cmc"),
        cmc_dir=subpath(input.parameters, parent=True),
    shell:
        "homodyne-steps plot-cmc --cmc-dir {params.cmc_dir:q} --shards {input.shards:q} "
        "--nlsq-parameters {input.nlsq:q} --out-dir {output:q} "
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
