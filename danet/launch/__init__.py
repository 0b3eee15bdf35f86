"""The launch layer: everything that turns grids and searches into runs.

`contract` (a cell's argv, config, record folder and hash), `trials` (the Optuna trial lifecycle the
drivers share), `optuna_driver`, `sweep_files` and `yaml_executor` (W&B sweep files without W&B's
server), `slurm_jobs`, `storages`, `processes`. It calls the runner (`danet.runner`), never the
command line; importing it loads no torch.
"""
