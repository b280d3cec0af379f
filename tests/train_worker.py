"""Run the pretrain stage of a config whose upstream artifacts exist (used by the SIGKILL test)."""

import sys

from jielong.flows.stages import STAGES, stage_keys
from jielong.tasks.config import load_config
from jielong.tasks.core.contract import compute_artifact, load_artifact

if __name__ == "__main__":
    cfg = load_config("tiny", sys.argv[1:])
    keys = stage_keys(cfg)
    stage = next(s for s in STAGES if s.name == "pretrain")
    inputs = {name: load_artifact(cfg.workspace_path(), name, keys[name]) for name in stage.inputs}
    compute_artifact(stage, cfg, keys["pretrain"], inputs)
