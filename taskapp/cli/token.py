"""`taskapp token`: an access token signed with the dev key of `taskapp run`."""

from __future__ import annotations

import argparse
import sys

from taskapp.cli.settings import load_settings
from taskapp.config import Environment, EnvironmentSettings


def cmd_token(args: argparse.Namespace) -> None:
    """Print an access token signed with the dev key of `taskapp run`."""
    from taskapp.auth.devkey import DEV_ISSUER, load_dev_key, mint_token

    # Checked before anything else, so production gets this answer and not a settings error.
    if EnvironmentSettings().env is Environment.PRODUCTION:
        sys.exit("taskapp token is refused when TASKAPP_ENV=production")
    settings = load_settings()
    roles = [role for value in args.roles for role in value.split(",") if role]
    data_dir = settings.data_dir.resolve()
    try:
        key = load_dev_key(data_dir)
    except FileNotFoundError:
        # A key made here would not be the one `taskapp run` trusts.
        sys.exit(
            f"taskapp token: no dev key in {data_dir}; start `taskapp run` first, "
            "or set TASKAPP_DATA_DIR to the directory it uses"
        )
    print(
        mint_token(
            key,
            issuer=DEV_ISSUER,
            audience=settings.oidc.audience,
            subject=args.sub,
            roles=roles,
            email=args.email,
            name=args.name,
            lifetime=args.lifetime,
        )
    )
