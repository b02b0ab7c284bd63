"""The pipeline stages, one module each, every one a plain function
`run(params, ws, log) -> summary` that reads its inputs from the workspace, computes, and writes
its outputs atomically. `lmeraser.stages` lists them with their inputs and outputs; the CLI,
the Prefect flows, dvc.yaml, the benchmarks and the tests all go through that list."""
