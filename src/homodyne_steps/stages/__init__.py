"""One short driver per workflow stage (what `homodyne-steps <stage>` runs): read the
inputs, call the layers below, write the records. Imports everything below; no stage
imports another stage.
"""
