# Appended by `make serving-image` to the Dockerfile MLflow generates for the champion, whose
# image would otherwise serve as root. nginx (MLflow's front on port 8080, started by the
# entrypoint) writes its logs and request buffers in these folders and its pid to /tmp; on
# Kubernetes they are emptyDirs (deploy/k8s/serving.yaml: read-only root filesystem).
RUN chown -R 1000:1000 /var/lib/nginx /var/log/nginx
ENV HOME=/tmp
USER 1000
