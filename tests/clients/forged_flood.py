"""A pod flooding the agent with forged tokens, fire and forget.

Usage: forged_flood.py HOST TOKENS_FILE RATE HOLD_SECONDS

Reads one token a line; opens a new connection for each, at RATE a second, sends the credential
request, and drops the connection HOLD_SECONDS later whether or not it was answered (the attacker
never waits). Prints one JSON line: requests sent, connections refused or failed, and the statuses
of the answers that came within the hold.
"""

import asyncio
import json
import sys
import time


async def one(host, token, hold, stats):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, 80), 1.0)
    except Exception as e:
        stats["connect_failed"] += 1
        kind = type(e).__name__
        stats["errors"][kind] = stats["errors"].get(kind, 0) + 1
        return
    try:
        writer.write(
            (
                "GET /v1/credentials HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\n\r\n"
                % (host, token)
            ).encode()
        )
        await writer.drain()
        stats["sent"] += 1
        try:
            head = await asyncio.wait_for(reader.readline(), hold)
            parts = head.decode(errors="replace").split()
            status = parts[1] if len(parts) > 1 else "none"
        except asyncio.TimeoutError:
            status = "unanswered"
        stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
    except Exception:
        stats["connect_failed"] += 1
    finally:
        writer.transport.abort()


async def main():
    host, path, rate, hold = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    with open(path) as f:
        tokens = [line.strip() for line in f if line.strip()]
    stats = {"attempted": len(tokens), "sent": 0, "connect_failed": 0, "statuses": {}, "errors": {}}
    start = time.monotonic()
    tasks = []
    for i, token in enumerate(tokens):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(host, token, hold, stats)))
    await asyncio.gather(*tasks)
    stats["seconds"] = time.monotonic() - start
    print(json.dumps(stats), flush=True)


asyncio.run(main())
