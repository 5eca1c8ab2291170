# Synthetic datasets (the embedded demo): the model with known truth, as a real APS file.


rule simulate:
    output:
        data="resources/{simulated}/{simulated}.hdf",
        truth="resources/{simulated}/truth.json",
    log:
        "logs/{simulated}/simulate.log",
    conda:
        ENV
    params:
        settings=lambda wildcards: stage_settings(config, "simulate", wildcards.simulated),
        format=lambda wildcards: config["simulate"][wildcards.simulated].get("format", "aps_u"),
        code=code_fingerprint("simulate"),
    shell:
        "homodyne-steps simulate --out {output.data:q} --truth {output.truth:q} "
        "--format {params.format} --settings {params.settings:q} > {log:q} 2>&1"
