# Consensus Monte Carlo: shard plan -> one NUTS job per shard -> consensus combine.
# The plan is a checkpoint (the shard count follows from the data); shard files carry the
# count in their path (K{n}), so a new count never reuses stale shards, and they depend
# on the plan, so a new assignment reruns them.
checkpoint cmc_plan:
    input:
        "results/{dataset}/data/qc.npz",
    output:
        plan="results/{dataset}/cmc/plan.json",
        npz="results/{dataset}/cmc/plan.npz",
    log:
        "logs/{dataset}/cmc_plan.log",
    conda:
        ENV
    params:
        settings=settings_of("cmc_plan"),
        code=code_fingerprint("cmc_plan"),
    shell:
        "homodyne-steps cmc-plan --input {input:q} --out-json {output.plan:q} "
        "--out-npz {output.npz:q} --settings {params.settings:q} > {log:q} 2>&1"


rule cmc_shard:
    input:
        data="results/{dataset}/data/qc.npz",
        plan="results/{dataset}/cmc/plan.npz",
        nlsq="results/{dataset}/nlsq/parameters.json",
        fitted="results/{dataset}/nlsq/fitted_data.npz",
    output:
        nc="results/{dataset}/cmc/K{n}/shards/{k}.nc",
        record="results/{dataset}/cmc/K{n}/shards/{k}.json",
    log:
        "logs/{dataset}/cmc_shard_K{n}_{k}.log",
    wildcard_constraints:
        n=r"\d+",
        k=r"\d+",
    conda:
        ENV
    threads: cmc_resource("threads", 1)
    resources:
        mem_mb=cmc_resource("mem_mb", 4000),
        runtime=cmc_resource("runtime", 60),
        gpu=cmc_resource("gpu", 0),
    params:
        settings=settings_of("cmc_shard"),
        code=code_fingerprint("cmc_shard"),
    shell:
        "homodyne-steps --threads {threads} cmc-shard --input {input.data:q} "
        "--plan {input.plan:q} --nlsq-parameters {input.nlsq:q} "
        "--nlsq-fitted {input.fitted:q} --shard {wildcards.k} "
        "--out-nc {output.nc:q} --out-json {output.record:q} "
        "--settings {params.settings:q} > {log:q} 2>&1"


rule cmc_combine:
    input:
        shards=cmc_shard_files,
        records=lambda wildcards: cmc_shard_files(wildcards, "json"),
        data="results/{dataset}/data/qc.npz",
        nlsq="results/{dataset}/nlsq/parameters.json",
        nlsq_fitted="results/{dataset}/nlsq/fitted_data.npz",
    output:
        parameters="results/{dataset}/cmc/parameters.json",
        analysis="results/{dataset}/cmc/analysis_results_cmc.json",
        diagnostics="results/{dataset}/cmc/diagnostics.json",
        samples="results/{dataset}/cmc/samples.npz",
        posterior="results/{dataset}/cmc/posterior.nc",
        fitted="results/{dataset}/cmc/fitted_data.npz",
        report="results/{dataset}/cmc/combination_report.json",
    log:
        "logs/{dataset}/cmc_combine.log",
    conda:
        ENV
    params:
        settings=settings_of("cmc_combine"),
        code=code_fingerprint("cmc_combine"),
        out_dir=subpath(output.parameters, parent=True),
    shell:
        "homodyne-steps cmc-combine --input {input.data:q} --shards {input.shards:q} "
        "--nlsq-parameters {input.nlsq:q} --nlsq-fitted {input.nlsq_fitted:q} "
        "--out-dir {params.out_dir:q} "
        "--settings {params.settings:q} > {log:q} 2>&1"
