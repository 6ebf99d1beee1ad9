"""Run a prune job and SIGKILL it at one progress point: the kill is injected through the
driver's ``on_event`` callback (production code reads no environment variable for it).

    python -m tests.kill_run '<PruneConfig as JSON>' SHOT POINT
    python -m tests.kill_run SHOT:POINT prune ARGS...       # the CLI, with the kill injected

POINT ``start``: as shot SHOT begins; ``update``: before the update of the middle decoder
layer of shot SHOT (half the layers updated: mid-shot).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from llm_surgeon.config import PruneConfig
from llm_surgeon.driver import prune


def killer(shot: int, point: str):
    def on_event(name: str, **info: Any) -> None:
        if info.get("shot") != shot:
            return
        if (point == "start" and name == "shot") or (
            point == "update" and name == "update" and info["layer"] == info["layers"] // 2
        ):
            os.kill(os.getpid(), signal.SIGKILL)

    return on_event


def command(cfg: PruneConfig, shot: int, point: str) -> tuple[list[str], dict[str, str], Path]:
    """The subprocess command, environment and working folder that run ``cfg`` and kill it."""
    from dataclasses import asdict

    root = Path(__file__).resolve().parent.parent
    return ([sys.executable, "-m", "tests.kill_run", json.dumps(asdict(cfg)), str(shot), point],
            env(), root)


def env() -> dict[str, str]:
    """The environment a subprocess needs to run ``-m tests.kill_run``."""
    root = Path(__file__).resolve().parent.parent
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root),
                                           os.environ.get("PYTHONPATH", "")])}


if __name__ == "__main__":
    if sys.argv[1].startswith("{"):
        cfg = PruneConfig(**json.loads(sys.argv[1]))
        prune(cfg, progress=False, on_event=killer(int(sys.argv[2]), sys.argv[3]))
    else:  # the command line, every prune given the kill (a test-only plugin)
        import llm_surgeon.driver as driver
        from llm_surgeon.cli import main

        shot, point = sys.argv[1].split(":")
        real = driver.prune

        def prune_with_kill(*args: Any, **kwargs: Any) -> dict[str, Any]:
            return real(*args, **kwargs, on_event=killer(int(shot), point))

        driver.prune = prune_with_kill
        sys.exit(main(sys.argv[2:]))
