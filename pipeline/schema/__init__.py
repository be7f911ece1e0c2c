"""The composed configuration's contract: every section of `params.yaml` as a typed model.

`parse_params(params)` turns a composed config (a plain dict, as Hydra and DVC write it) into
the typed `Params` whose sections each stage hands down; `validate_params(params)` only checks
it. Both raise `InvalidConfig` listing every problem, one line each, naming the full key, the
value given and what is allowed:

    models.cnn3d.train.epochs=-5: must be a whole number >= 1
    models.cnn_gru.dropuot=0.2: not a setting of models.cnn_gru (it has: dense_units, dropout, ...)

It runs where a config is composed (`python -m pipeline.params`), where a stage starts
(`load_config`: a hand-edited `params.yaml`, or one `dvc exp run -S` composed) and before a
sweep's first job. The models are strict: no silent casts ("5" is not a number, 1 is not
`true`), no unknown keys, choices as `Literal`s, numbers bounded. Pydantic v2 rather than Hydra
structured configs: `dvc exp run -S` composes `conf/` inside DVC's own process, which never
imports this package, so a ConfigStore schema would not be consulted there; checking the
written `params.yaml` at every entry point covers DVC, Hydra and hand edits alike.
"""

from pipeline.schema.model_sections import ModelSection
from pipeline.schema.problems import InvalidConfig, parse_params, unknown_setting, validate_params
from pipeline.schema.sections import Params

__all__ = [
    "InvalidConfig",
    "ModelSection",
    "Params",
    "parse_params",
    "unknown_setting",
    "validate_params",
]
