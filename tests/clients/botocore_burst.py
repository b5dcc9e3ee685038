#!/usr/bin/env python3
"""Many pods' first credential fetch at once, each with botocore's own ContainerProvider.

One thread per pod, each with its own ContainerProvider (and so its own ContainerMetadataFetcher: botocore's
policy unchanged, 3 attempts, 2 s timeout, 1 s apart) and its own token file. The providers are built first;
the fetches start together when a line arrives on stdin, so that several processes start at once.

argv: URI TOKEN_FILE... Prints "ready" on stderr when set up, then after the fetches one JSON line on stdout:
[{"ok": bool, "elapsed": seconds, "attempts": n, "error": str or null}, ...] in argv order.
"""
import json
import sys
import threading
import time

from botocore.credentials import ContainerProvider


def main():
    uri, token_files = sys.argv[1], sys.argv[2:]
    providers = []
    for path in token_files:
        provider = ContainerProvider(
            environ={
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": uri,
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": path,
            }
        )
        providers.append(provider)
    results = [None] * len(providers)

    def fetch(i, provider):
        attempts = [0]
        # Count the attempts botocore makes; its retry loop is untouched.
        get_response = provider._fetcher._get_response

        def counted(*args, **kwargs):
            attempts[0] += 1
            return get_response(*args, **kwargs)

        provider._fetcher._get_response = counted
        started = time.monotonic()
        try:
            provider.load().get_frozen_credentials()
            ok, error = True, None
        except Exception as e:  # noqa: BLE001 - any failure is the result under test
            ok, error = False, f"{type(e).__name__}: {e}"
        results[i] = {
            "ok": ok,
            "elapsed": time.monotonic() - started,
            "attempts": attempts[0],
            "error": error,
        }

    threads = [threading.Thread(target=fetch, args=(i, p)) for i, p in enumerate(providers)]
    print("ready", file=sys.stderr, flush=True)
    sys.stdin.readline()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
