# The tracking server's image for deploy/k8s/mlflow-server.yaml: MLflow with its basic-auth app
# (the `auth` extra), the PostgreSQL driver and boto3 (artifacts on S3). Versions as in this
# project's tests.
#   docker build -f deploy/mlflow-server.Dockerfile -t REGISTRY/handball-mlflow-server:3.17.2 .
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2"
EXPOSE 5000
USER 1000
