"""Finding the champion: the registered model and alias of a config's dataset, the model
`predict` uses by default, and `python -m pipeline.serving.champion`, which prints the
champion's URI for the project's `params.yaml` (`make serving-image`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import dataset_name, load_config
from pipeline.errors import PipelineError, is_refusal
from pipeline.logs import setup_logging
from pipeline.schema import Params
from pipeline.schema.sections import Compare, DatasetBase
from pipeline.serving.registry import registered_name

log = logging.getLogger(__name__)


def champion_name(compare: Compare, dataset: DatasetBase) -> str:
    """The registered model holding the champion of `dataset` (`compare.register_as`)."""
    return registered_name(compare.register_as, dataset_name(dataset))


def champion_uri(compare: Compare, dataset: DatasetBase) -> str:
    """`models:/<registered model>@<alias>` of the champion of `dataset`."""
    return f"models:/{champion_name(compare, dataset)}@{compare.alias}"


def default_model(config: Params, store: str) -> tuple[str, str]:
    """(model URI, what it is): the registered champion of the config's dataset, else the best
    model of the latest comparison run in the project's MLflow store."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    registers, alias = config.compare.register_as is not None, config.compare.alias
    name = champion_name(config.compare, config.dataset) if registers else None
    champion = f"{name}@{alias}" if registers else "champion"
    if registers:
        try:
            version = client.get_model_version_by_alias(name, alias)
            return (
                f"models:/{champion}",
                f"the registered {name}@{alias}: version {version.version}, "
                f"{version.tags.get('model', '?')} from run {version.run_id}",
            )
        except MlflowException as exc:
            if is_refusal(exc):  # not "no such champion": the server said no
                raise
    experiment = client.get_experiment_by_name(config.mlflow.experiment)
    runs = (
        client.search_runs(
            [experiment.experiment_id],
            filter_string="tags.model = 'comparison'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if experiment
        else []
    )
    if runs and runs[0].data.tags.get("best_model_uri"):
        tags = runs[0].data.tags
        return (
            tags["best_model_uri"],
            f"no {champion} is registered; the best model ({tags.get('best_model')}) "
            f"of the latest comparison run {runs[0].info.run_id}",
        )
    raise PipelineError(
        f"no model to use: no registered {champion} and no comparison run "
        f"in {store}. Run the pipeline first (`dvc repro`) or pass --model URI"
    )


def main(argv: list[str] | None = None) -> None:
    """Print the model URI of the champion of this project's dataset (`make serving-image`)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--params", type=Path, help="params.yaml (default: the project's)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config = load_config(args.params)
    except (PipelineError, FileNotFoundError) as exc:
        log.error("%s", exc)
        sys.exit(2)
    if config.compare.register_as is None:
        log.error("compare.register_as is null: this project registers no champion")
        sys.exit(2)
    sys.stdout.write(champion_uri(config.compare, config.dataset) + "\n")


if __name__ == "__main__":
    main()
