# Quickstart: `make repro` (set up + run the pipeline on the embedded sample), `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two installs from uv.lock's hash-checked exports (`make lock` writes them, and the training
# image's requirements/s3.txt): `make setup` the runtime only (the stages, predict and serving),
# `make setup-dev` adds the test tooling. uv installs them (its pinned, hash-checked wheel from
# requirements/dev.txt, put in the environment by pip): 108 s for the runtime where pip took
# 581 s (docs/install.md). uv reads the index from UV_INDEX_URL / UV_DEFAULT_INDEX, not pip.conf.
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev
UV := $(BIN)/uv
UV_INSTALL := $(UV) pip install --quiet --no-deps --compile-bytecode --python $(BIN)/python

.PHONY: setup setup-dev lock repro lint docs test test-real test-all params clean-outputs serving-image

$(UV): requirements/dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 14))' || \
	  { echo "Python 3.11 to 3.13 is required (found $$($(PYTHON) --version))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	sed -n '/^uv==/,/[^\\]$$/p' requirements/dev.txt > $(VENV)/uv-requirement.txt
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r $(VENV)/uv-requirement.txt
	@touch $@

$(RUNTIME_STAMP): requirements/runtime.txt pyproject.toml $(UV)
	$(UV_INSTALL) --require-hashes -r requirements/runtime.txt
	$(UV_INSTALL) -e .
	@test -d .git || git init -q
	@touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements/dev.txt
	$(UV_INSTALL) --require-hashes -r requirements/dev.txt
	@touch $@

setup: $(RUNTIME_STAMP)

setup-dev: $(DEV_STAMP)

# Re-resolve uv.lock from pyproject.toml (newest versions within its bounds that install on
# every platform of [tool.uv]) and write its exports; commit all three.
lock: setup-dev
	$(BIN)/uv lock --upgrade
	$(BIN)/uv export --quiet --frozen --no-emit-project --format requirements-txt -o requirements/runtime.txt
	$(BIN)/uv export --quiet --frozen --no-emit-project --extra dev --format requirements-txt -o requirements/dev.txt
	$(BIN)/uv export --quiet --frozen --no-emit-project --extra s3 --format requirements-txt -o requirements/s3.txt

repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo
	@echo "Done. Compare the models (in a new shell, activate the environment first):"
	@echo "  source $(BIN)/activate"
	@echo "  dvc metrics show"
	@echo "  cat reports/comparison.md"
	@echo "  mlflow ui --backend-store-uri sqlite:///mlflow.db   # then open http://127.0.0.1:5000"
	@echo "  (in the UI, click 'Model training' at the top left once: MLflow opens on GenAI)"

# Style and architecture: ruff (pyproject.toml [tool.ruff]) and the import contracts
# (pyproject.toml [tool.importlinter]: layers, serving without training code, no cycles).
lint: setup-dev
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/ruff format --check pipeline tests benchmarks
	$(BIN)/lint-imports

# The documentation site (mkdocs.yml, docs/): a broken link, a missing page or a page left out
# of the navigation fails the build.
docs: setup-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Two test processes (pytest-xdist) on the two cores of a laptop: while one runs the shared tiny
# `dvc repro` and the tests that read it (one group, tests/conftest.py), the other runs the rest.
# `make test TEST_WORKERS=0` (or `make test-all TEST_WORKERS=0`) runs every test in one process.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup
test: lint docs
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow and not real_data" $(XDIST)

# Opt-in tests on real footage (../shared/data/real); they skip when it is absent.
test-real: setup-dev
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m real_data

test-all: lint docs
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(XDIST)

# The build context of the serving image for deploy/k8s/serving.yaml: a Dockerfile and the
# registered champion of params.yaml's dataset (compare.register_as, @champion; printed by
# `python -m pipeline.serving.champion`) from MLFLOW_TRACKING_URI, else this project's store,
# made to run as a non-root user (deploy/serving-image-user.Dockerfile). Then:
# docker build -t REGISTRY/handball-action-classifier:champion $(SERVING_IMAGE_DIR)
SERVING_IMAGE_DIR ?= deploy/serving-image
serving-image: setup
	rm -rf $(SERVING_IMAGE_DIR)
	uri=$$($(BIN)/python -m pipeline.serving.champion) && \
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
	  $(BIN)/mlflow models generate-dockerfile -m "$$uri" -d $(SERVING_IMAGE_DIR) && cat deploy/serving-image-user.Dockerfile >> $(SERVING_IMAGE_DIR)/Dockerfile

params: setup
	$(BIN)/python -m pipeline.params
