# NLSQ fit: bounded least squares on the one kernel (all angles in one problem).


rule nlsq:
    input:
        "results/{dataset}/data/qc.npz",
    output:
        parameters="results/{dataset}/nlsq/parameters.json",
        analysis="results/{dataset}/nlsq/analysis_results_nlsq.json",
        convergence="results/{dataset}/nlsq/convergence_metrics.json",
        fitted="results/{dataset}/nlsq/fitted_data.npz",
    log:
        "logs/{dataset}/nlsq.log",
    conda:
        ENV
    # Every core of a local run (--cores); a cluster run has no --cores: 4, or the
    # cluster profile's set-threads.
    threads: workflow.resource_settings.cores or 4
    params:
        settings=settings_of("nlsq"),
        code=code_fingerprint("nlsq"),
        out_dir=subpath(output.parameters, parent=True),
    shell:
        "homodyne-steps --threads {threads} nlsq --input {input:q} "
        "--out-dir {params.out_dir:q} --settings {params.settings:q} > {log:q} 2>&1"
