# The data stages: load/validate -> filter -> preprocess -> QC.


rule load:
    input:
        dataset_file,
    output:
        npz="results/{dataset}/data/loaded.npz",
        record="results/{dataset}/data/loaded.json",
    log:
        "logs/{dataset}/load.log",
    conda:
        ENV
    params:
        settings=settings_of("load"),
        code=code_fingerprint("load"),
    shell:
        "homodyne-steps load --input {input:q} --out-npz {output.npz:q} "
        "--out-json {output.record:q} --settings {params.settings:q} > {log:q} 2>&1"


rule filter:
    input:
        "results/{dataset}/data/loaded.npz",
    output:
        npz="results/{dataset}/data/filtered.npz",
        report="results/{dataset}/data/filter_report.json",
    log:
        "logs/{dataset}/filter.log",
    conda:
        ENV
    params:
        settings=settings_of("filter"),
        code=code_fingerprint("filter"),
    shell:
        "homodyne-steps filter --input {input:q} --out-npz {output.npz:q} "
        "--out-json {output.report:q} --settings {params.settings:q} > {log:q} 2>&1"


rule preprocess:
    input:
        "results/{dataset}/data/filtered.npz",
    output:
        npz="results/{dataset}/data/preprocessed.npz",
        provenance="results/{dataset}/data/provenance.json",
    log:
        "logs/{dataset}/preprocess.log",
    conda:
        ENV
    params:
        settings=settings_of("preprocess"),
        code=code_fingerprint("preprocess"),
    shell:
        "homodyne-steps preprocess --input {input:q} --out-npz {output.npz:q} "
        "--out-json {output.provenance:q} --settings {params.settings:q} > {log:q} 2>&1"


rule qc:
    input:
        raw="results/{dataset}/data/loaded.npz",
        filtered="results/{dataset}/data/filtered.npz",
        preprocessed="results/{dataset}/data/preprocessed.npz",
    output:
        report="results/{dataset}/data/qc_report.json",
        npz="results/{dataset}/data/qc.npz",
    log:
        "logs/{dataset}/qc.log",
    conda:
        ENV
    params:
        settings=settings_of("qc"),
        code=code_fingerprint("qc"),
    shell:
        "homodyne-steps qc --raw {input.raw:q} --filtered {input.filtered:q} "
        "--preprocessed {input.preprocessed:q} --out-json {output.report:q} "
        "--out-npz {output.npz:q} --settings {params.settings:q} > {log:q} 2>&1"
