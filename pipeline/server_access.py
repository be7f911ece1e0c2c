"""Accounts and permissions on the team's MLflow tracking server (MLflow's basic-auth app,
deploy/k8s/mlflow-server.yaml): what its admin runs, with MLflow's own auth client.

    python -m pipeline.server_access add-user ana            # asks for ana's password
    python -m pipeline.server_access grant ana EDIT --experiment handball-actions
    python -m pipeline.server_access grant bo MANAGE --registered-model handball-action-classifier-uniri_hbd
    python -m pipeline.server_access show ana --experiment handball-actions

The admin's own account comes from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD and the
server from MLFLOW_TRACKING_URI, as for every other command. `grant` creates the experiment or
the registered model when it does not exist yet, so that its owner is the admin and not
whichever user logs to it first (MLflow gives the creator MANAGE). A new account holds the
server's default permission (READ in this project's deployment) on everything else.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
import warnings

from pipeline.errors import PipelineError, is_refusal, server_refusals
from pipeline.logs import setup_logging

log = logging.getLogger(__name__)

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "DENY", "NO_PERMISSIONS")
MIN_PASSWORD_LENGTH = 12  # MLflow's own minimum


def server_uri() -> str:
    """The tracking server of MLFLOW_TRACKING_URI; an admin command has no local store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise PipelineError(
            "MLFLOW_TRACKING_URI must name the team's tracking server (http://… or https://…), "
            f"not {uri or 'nothing'!r}"
        )
    return uri


def auth_client(uri: str):
    with warnings.catch_warnings():  # the server's web framework, imported with the client
        warnings.filterwarnings("ignore", message=".*deprecated")
        from mlflow.server import get_app_client

        return get_app_client("basic-auth", tracking_uri=uri)


def read_password(username: str) -> str:
    """The new account's password: asked for on a terminal, else the first line of stdin (never
    an argument, which `ps` and the shell's history would show)."""
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {username}: ")
        if getpass.getpass("again: ") != password:
            raise PipelineError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise PipelineError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    return password


def resource(args: argparse.Namespace, uri: str, create: bool) -> tuple[str, str, str]:
    """(resource type, resource id, what to call it) of --experiment / --registered-model,
    created when absent and `create`."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if args.registered_model:
        name = args.registered_model
        if create:
            try:
                client.get_registered_model(name)
            except MlflowException as exc:
                if is_refusal(exc):  # not "no such model": the server said no
                    raise
                client.create_registered_model(name)
                log.info("created the registered model %s", name)
        return "registered_model", name, f"registered model {name}"
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        if not create:
            raise PipelineError(f"no experiment named {args.experiment!r} on {uri}")
        experiment_id = client.create_experiment(args.experiment)
        log.info("created the experiment %s (id %s)", args.experiment, experiment_id)
    else:
        experiment_id = experiment.experiment_id
    return "experiment", experiment_id, f"experiment {args.experiment} (id {experiment_id})"


def grant(client, username: str, kind: str, resource_id: str, permission: str) -> None:
    """Give `username` `permission` on one resource, replacing what they held there (MLflow
    refuses a second grant on the same resource)."""
    from mlflow.exceptions import MlflowException

    try:
        client.grant_user_permission(username, kind, resource_id, permission)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.revoke_user_permission(username, kind, resource_id)
        client.grant_user_permission(username, kind, resource_id, permission)


def run_command(args: argparse.Namespace) -> None:
    uri = server_uri()
    client = auth_client(uri)
    if args.command == "add-user":
        client.create_user(args.username, read_password(args.username))
        log.info("created user %s on %s", args.username, uri)
        return
    kind, resource_id, label = resource(args, uri, create=args.command == "grant")
    if args.command == "grant":
        grant(client, args.username, kind, resource_id, args.permission)
        log.info("%s now holds %s on the %s", args.username, args.permission, label)
        return
    held = client.get_user_permission(args.username, kind, resource_id)
    sys.stdout.write(f"{args.username}: {held.permission} on the {label}\n")


def add_target(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--experiment", help="an MLflow experiment, by name")
    target.add_argument("--registered-model", help="a registered model, by name")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.server_access", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_user = commands.add_parser("add-user", help="create an account (password from stdin)")
    add_user.add_argument("username")
    grant = commands.add_parser("grant", help="give a user a permission on one resource")
    grant.add_argument("username")
    grant.add_argument("permission", choices=PERMISSIONS)
    add_target(grant)
    show = commands.add_parser("show", help="print what a user holds on one resource")
    show.add_argument("username")
    add_target(show)
    args = parser.parse_args(argv)
    setup_logging()
    from mlflow.exceptions import MlflowException

    try:
        with server_refusals():
            run_command(args)
    except PipelineError as exc:
        log.error("%s", exc)
        sys.exit(2)
    except MlflowException as exc:  # e.g. the user exists already, no such user
        log.error("%s: %s", args.command, server_answer(exc))
        sys.exit(2)


def server_answer(exc) -> str:
    """What the server said, without MLflow's "API request to endpoint ... failed" preamble."""
    message = str(exc)
    _, _, body = message.partition("Response body: ")
    return (body.strip("'\"") or message).splitlines()[0]  # not the SQL statement below it


if __name__ == "__main__":
    main()
