"""The run-folder helpers under their former import path (smat_dist.demo imports them from here).

The smat-train entry point is `smat_dist.launch.cli:main` (launch depends on train, never the reverse); the
run folder and the pre-flight checks live in `smat_dist.train.run_folder`.
"""
from smat_dist.train.run_folder import CONFIG_FILE, check, check_data, prepare_run_dir, resumed_config

__all__ = ["CONFIG_FILE", "check", "check_data", "prepare_run_dir", "resumed_config"]
