"""What MLflow runs to rebuild a logged classifier ("models from code"): each file hands its
pyfunc to `mlflow.models.set_model`; nothing is pickled. Not imported by the pipeline itself:
`pipeline.serving.pyfunc` logs these files by path."""
