"""Compose `conf/` with Hydra and write `params.yaml`, the form DVC stages read.

python -m pipeline.params                      # default composition
python -m pipeline.params experiment=tiny      # with Hydra overrides
python -m pipeline.params --check              # exit 1 if params.yaml is stale
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.common import repo_root, setup_logging, write_text_atomic

log = logging.getLogger(__name__)


def compose_params(overrides: list[str] | None = None, conf_dir: Path | None = None) -> dict:
    """The composed configuration as a plain dict (what DVC's Hydra integration produces)."""
    conf_dir = (conf_dir or repo_root() / "conf").resolve()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    return OmegaConf.to_container(cfg, resolve=True)


def dump_params(params: dict) -> str:
    return yaml.safe_dump(params, sort_keys=False, default_flow_style=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compose conf/ into params.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. frames.size=96")
    parser.add_argument("--out", default=None, help="output file (default: params.yaml)")
    parser.add_argument("--check", action="store_true", help="only check params.yaml is current")
    args = parser.parse_args(argv)
    setup_logging()
    out = Path(args.out) if args.out else repo_root() / "params.yaml"
    params = compose_params(args.overrides)
    if args.check:
        current = yaml.safe_load(out.read_text(encoding="utf-8")) if out.is_file() else None
        if current != params:
            log.error(
                "%s differs from the composition of conf/: run `python -m pipeline.params`", out
            )
            sys.exit(1)
        log.info("%s matches conf/", out)
        return
    write_text_atomic(out, dump_params(params))
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
