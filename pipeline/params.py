"""Compose `conf/` with Hydra and write `params.yaml`, the form DVC stages read.

python -m pipeline.params                      # default composition
python -m pipeline.params experiment=tiny      # with Hydra overrides
python -m pipeline.params --check              # exit 1 if params.yaml is stale

The composition is checked against `pipeline/schema.py` before anything is written: every
problem is logged on one line (key, value, what is allowed) and the exit status is 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.atomic import write_text_atomic
from pipeline.config import repo_root
from pipeline.logs import setup_logging
from pipeline.schema import InvalidConfig, unknown_setting, validate_params
from pipeline.schema.problems import field_at

log = logging.getLogger(__name__)


def compose_params(overrides: list[str] | None = None, conf_dir: Path | None = None) -> dict:
    """The composed configuration as a plain dict (what DVC's Hydra integration produces)."""
    conf_dir = (conf_dir or repo_root() / "conf").resolve()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    return OmegaConf.to_container(cfg, resolve=True)


def dump_params(params: dict) -> str:
    return yaml.safe_dump(params, sort_keys=False, default_flow_style=False)


def hydra_problem(exc: Exception, overrides: list[str]) -> str:
    """One line for a composition Hydra refuses: an override of a key conf/ does not have
    reads like the schema's own line (the settings it could have meant), anything else is
    Hydra's message on one line."""
    unknown = re.match(r"Could not override '([^']+)'", str(exc))
    if unknown and not unknown[1].startswith(("model@", "hydra")) and "=" in "".join(overrides):
        key = unknown[1]
        given = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o}
        value = yaml.safe_load(given.get(key, "") or "null")
        _, field = field_at(key.split("."))
        if field is not None:  # the schema has it; conf/ leaves it at the schema's default
            return (
                f"{key}={value!r}: conf/ does not set {key} (its default is "
                f"{field.get_default(call_default_factory=True)!r}): add it with "
                f"+{key}={given.get(key, '')}"
            )
        return unknown_setting(key.split("."), value)
    return " ".join(str(exc).split())


def checked_composition(overrides: list[str]) -> dict:
    """The composition of conf/ with `overrides`, checked against the schema; a problem with
    either ends the process with one log line per problem and exit status 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return validate_params(compose_params(overrides))
    except InvalidConfig as exc:
        problems = exc.problems
    except (HydraException, OmegaConfBaseException) as exc:  # a typo, a bad override
        problems = [hydra_problem(exc, overrides)]
    for line in problems:
        log.error("%s", line)
    log.error(
        "conf/ + %s: %d problem(s); nothing written", " ".join(overrides) or "()", len(problems)
    )
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compose conf/ into params.yaml")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. frames.size=96")
    parser.add_argument("--out", default=None, help="output file (default: params.yaml)")
    parser.add_argument("--check", action="store_true", help="only check params.yaml is current")
    args = parser.parse_args(argv)
    setup_logging()
    out = Path(args.out) if args.out else repo_root() / "params.yaml"
    params = checked_composition(args.overrides)
    if args.check:
        current = yaml.safe_load(out.read_text(encoding="utf-8")) if out.is_file() else None
        try:
            if current is not None:
                validate_params(current)
        except InvalidConfig as exc:
            for line in exc.problems:
                log.error("%s: %s", out.name, line)
            sys.exit(2)
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
