"""fusion_bench entry point: `python run.py method=ties model=tiny_clip taskpool=tiny_eight finetune=standard`.

A user error (a bad option, a broken file given with finetuned_from, a full disk) is printed as one line and exits
1; HYDRA_FULL_ERROR=1 shows its traceback (fusion_bench/entry.py)."""

import os

# OpenMP threads that spin while waiting make torch many times slower on a busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra
from omegaconf import DictConfig

from fusion_bench.entry import main as run_job


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Returns the trial's average normalized val accuracy under hparams_search=optuna* (the sweeper maximises it)."""
    return run_job(cfg)


if __name__ == "__main__":
    main()
