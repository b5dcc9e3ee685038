#!/usr/bin/env python3
"""Fetch credentials the way an application on botocore (boto3, the AWS CLI) does in an EKS pod.

Uses botocore's own ContainerProvider, which reads only AWS_CONTAINER_CREDENTIALS_FULL_URI and
AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE (re-read on every fetch). Prints one JSON line
{access_key_id, secret_access_key, session_token, account_id, expiry} or exits 1 with the error on stderr.
"""
import json
import os
import sys
from datetime import timezone

from botocore.credentials import ContainerProvider


def main():
    try:
        creds = ContainerProvider(environ=os.environ).load()
        if creds is None:
            raise RuntimeError("ContainerProvider found no AWS_CONTAINER_CREDENTIALS_FULL_URI")
        frozen = creds.get_frozen_credentials()
    except Exception as e:  # noqa: BLE001 - any failure is the result under test
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    expiry = getattr(creds, "_expiry_time", None)
    print(json.dumps({
        "access_key_id": frozen.access_key,
        "secret_access_key": frozen.secret_key,
        "session_token": frozen.token,
        "account_id": getattr(frozen, "account_id", None) or getattr(creds, "account_id", None),
        "expiry": expiry.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if expiry else None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
