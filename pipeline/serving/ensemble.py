"""The ensemble as a model people use: its members' logged models in one MLflow pyfunc.

`EnsembleClassifier` decodes a clip once (the members share the frames stage's sampling) and
pools its members' probabilities (their weighted arithmetic or geometric mean), each member
running its own preprocessing (cnn_gru its feature backbone). `log_ensemble_classifier` packs
the members' logged models (their .keras file, preprocessing and backbone weights, as
`predict` would load them) with the weights and the pooling into one pyfunc with the
interface of a single model, so `pipeline.predict`, `mlflow models serve` and the registry
treat it like any model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import yaml

from pipeline.ensemble import POOLINGS, pooled_probabilities
from pipeline.errors import PipelineError
from pipeline.serving.classifier import ClipClassifier, VideoClassifier
from pipeline.serving.pyfunc import VideoClassifierModel, example_request, log_classifier_pyfunc
from pipeline.tensorflow_start import prepare_tensorflow

# the artifacts a member's logged model carries (pipeline.serving.pyfunc.log_video_classifier)
MEMBER_ARTIFACTS = ("keras_model", "preprocessing", "backbone_weights")


class EnsembleClassifier(ClipClassifier):
    """The members' probabilities pooled with `weights` (name -> weight) as `pooling`
    (arithmetic | geometric: `compare.ensemble.pooling`)."""

    def __init__(
        self, members: dict[str, VideoClassifier], weights: dict[str, float], pooling: str
    ):
        if pooling not in POOLINGS:
            raise PipelineError(f"ensemble pooling {pooling!r} is not one of {POOLINGS}")
        self.members = members
        self.weights = {name: float(weights[name]) for name in members}
        self.pooling = pooling
        first = next(iter(members.values())).pre
        for name, member in members.items():
            for key in ("classes", "frames"):
                if member.pre[key] != first[key]:
                    raise PipelineError(
                        f"ensemble member {name}'s {key} {member.pre[key]} differ from "
                        f"{first['model']}'s {first[key]}: its members must come from one "
                        "pipeline run"
                    )
        self.classes = list(first["classes"])
        self.pre = {
            "model": f"ensemble ({pooling} mean) of "
            + ", ".join(f"{name} ({w:.2f})" for name, w in self.weights.items()),
            "classes": self.classes,
            "frames": first["frames"],
            # clips decoded with optical flow when a member reads it (the others take the RGB)
            "flow": next((m.pre["flow"] for m in members.values() if m.pre.get("flow")), None),
            # a clip every member accepts
            "min_frames": max(int(m.pre.get("min_frames") or 1) for m in members.values()),
            "members": self.weights,
            "pooling": pooling,
        }

    def prepare(self) -> None:
        for member in self.members.values():
            member.prepare()

    def use_mirror_averaging(self) -> bool:
        """Mirror averaging for every member on frames (cnn_gru keeps its features)."""
        return any([member.use_mirror_averaging() for member in self.members.values()])

    def use_view_averaging(self) -> bool:
        """Averaging over views in time for every member that reads fewer frames than sampled."""
        return any([member.use_view_averaging() for member in self.members.values()])

    def probabilities(self, frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
        members = np.stack([self.members[n].probabilities(frames, masks) for n in self.weights])
        return pooled_probabilities(np.array(list(self.weights.values())), members, self.pooling)


class EnsembleClassifierModel(VideoClassifierModel):
    """MLflow pyfunc of an EnsembleClassifier: the input, output, limits and errors of
    VideoClassifierModel. Artifacts: `members` (a folder per member with its artifacts) and
    `ensemble` (json: per member its weight and artifact files under `members`)."""

    def load_context(self, context):
        prepare_tensorflow()  # a served model's process starts here
        import keras

        spec = json.loads(Path(context.artifacts["ensemble"]).read_text())
        root = Path(context.artifacts["members"])
        members = {}
        for name, member in spec["members"].items():
            files = {key: root / path for key, path in member["artifacts"].items()}
            members[name] = VideoClassifier(
                keras.models.load_model(files["keras_model"], compile=False),
                json.loads(files["preprocessing"].read_text()),
                str(files["backbone_weights"]) if "backbone_weights" in files else None,
            )
        weights = {name: member["weight"] for name, member in spec["members"].items()}
        # ensembles logged before `compare.ensemble.pooling` averaged their members
        self.classifier = EnsembleClassifier(members, weights, spec.get("pooling", "arithmetic"))
        self.classifier.prepare()


def copy_member_artifacts(model_uri: str, name: str, members_dir: Path) -> dict[str, str]:
    """Download a member's logged model and copy its artifacts to `members_dir/<name>/`;
    returns artifact key -> file path relative to `members_dir`."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        logged = flavor.get("artifacts") or {}
        if "keras_model" not in logged:
            raise PipelineError(f"{model_uri} is not a video classifier logged by this pipeline")
        copied = {}
        for key in MEMBER_ARTIFACTS:
            if key in logged:
                source = local / logged[key]["path"]
                target = members_dir / name / f"{key}{source.suffix}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                copied[key] = target.relative_to(members_dir).as_posix()
    return copied


def log_ensemble_classifier(
    member_uris: dict[str, str],
    weights: dict[str, float],
    pooling: str,
    classes: list[str],
    name: str,
):
    """Log the ensemble of the members' logged models (`member_uris`: name -> model URI),
    pooled with `weights` as `pooling`, in the active run as `name`. Returns MLflow's
    ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp:
        members_dir = Path(tmp) / "members"
        spec = {
            "pooling": pooling,
            "members": {
                member: {
                    "weight": float(weights[member]),
                    "artifacts": copy_member_artifacts(uri, member, members_dir),
                }
                for member, uri in member_uris.items()
            },
        }
        spec_file = Path(tmp) / "ensemble.json"
        spec_file.write_text(json.dumps(spec, indent=2))
        artifacts = {"members": str(members_dir), "ensemble": str(spec_file)}
        # the members share the frames stage's settings: any one's preprocessing shows a request
        first = next(iter(spec["members"].values()))["artifacts"]["preprocessing"]
        member = json.loads((members_dir / first).read_text())
        return log_classifier_pyfunc(
            name, "ensemble_classifier.py", artifacts, classes, example_request(member)
        )
