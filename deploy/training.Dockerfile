# The training image for deploy/k8s/training-job.yaml: this repository (with its git history,
# which DVC needs) and its dependencies with DVC's S3 remote, so each worker pulls the cached
# arrays it trains on from the team's remote. Built from the repository root:
#   docker build -f deploy/training.Dockerfile -t REGISTRY/handball-train:$(git rev-parse --short HEAD) .
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /work/handball
COPY . .
# the locked runtime with DVC's S3 remote (uv.lock's export, hashes checked), then the project
RUN pip install --no-cache-dir --no-deps --require-hashes -r requirements/s3.txt \
    && pip install --no-cache-dir --no-deps . && chown -R 1000:1000 /work/handball
ENV HOME=/work/handball HANDBALL_OPENVINO_CACHE=/tmp/openvino
USER 1000
