"""Stage `check_params`: `params.yaml` checked against the config schema before any stage runs.

DVC runs it first whenever `params.yaml` changes (`dvc exp run -S`, a hand edit): a config
that breaks `pipeline/schema/` stops `dvc repro` here, with one line per problem, before any
other stage starts and before DVC removes a stage's outputs to rerun it, so a typo costs
neither a trained model nor a report. Its output (`paths.checked_params`) is the same text
every time, so a config that passes reruns nothing downstream.
"""

from __future__ import annotations

from pipeline.atomic import write_text_atomic
from pipeline.config import resolve
from pipeline.stages.cli import stage_cli

CHECKED = "params.yaml follows the config schema (pipeline/schema/)\n"


def main(argv: list[str] | None = None) -> None:
    stage_cli(
        "check_params",
        __doc__.splitlines()[0],  # stage_cli's load_config refuses a config that breaks it
        lambda params, _: write_text_atomic(resolve(params.paths.checked_params), CHECKED),
        argv,
    )


if __name__ == "__main__":
    main()
