"""Entry point: `python run.py [group=option ...]`, or `python run.py -m attention=gqa,mha pos=alibi`."""
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
    from ablate.experiment import run

    return run(cfg)


if __name__ == "__main__":
    main()
