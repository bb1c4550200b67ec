"""Entry point: `python run.py [group=option ...]`, or `python run.py -m attention=gqa,mha pos=alibi`.

A refused configuration prints its reasons and exits with status 2; `python run.py --help` lists the groups.
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("ABLATE_ROOT", str(ROOT))
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ablate.config import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from ablate.cli import run_job

    return run_job(cfg)


if __name__ == "__main__":
    from ablate import cli

    cli.main(main)
