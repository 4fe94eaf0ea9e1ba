"""Whether the schemathesis runs of ci/schemathesis.sh reached the logic behind each operation.

A fuzz run whose requests all end in 400, 401, 404 or 429 passes every check schemathesis
makes and tests nothing behind the validation. This reads the runs' HAR reports and fails
when an operation listed below answered its success status fewer times than its floor. It
caught the exchange's run being answered 429 for every case (the admin-token run before it
had spent the client's failed-auth budget on /v1/tokens).

Usage: schemathesis_reached.py <openapi.yaml> <har>...   (the venv's python: needs PyYAML)
"""

import collections
import json
import re
import sys
from urllib.parse import urlsplit

import yaml

# operationId -> the fewest cases that must reach its success status (the one 2xx answer the
# spec gives it). The floors sit well under what a run reaches (see tests/README.md); they
# catch an operation that stopped being exercised, not a bad draw. redigestKey is not listed: a success needs an HMAC proof under
# the server's secret, which only a gateway can make (tests/redigest.rs covers it).
FLOORS = {
    "healthz": 1,
    "readyz": 1,
    "metrics": 1,
    "jwks": 1,
    "listKeys": 10,
    "createKey": 10,
    "getKey": 5,
    "updateKey": 10,
    "revokeKey": 5,
    "rotateKey": 3,
    "abortRotation": 1,
    "massRevoke": 1,
    "lookupKey": 3,
    "verifyKey": 3,
    "getKeyUsage": 5,
    "listAdminTokens": 1,
    "exchangeToken": 5,
}


def operations(spec):
    """(method, compiled path regex, operationId) for every operation of the spec, and each
    operation's success status (its only 2xx answer)."""
    ops, success = [], {}
    for path, item in spec["paths"].items():
        # Literal segments sort before templated ones so /v1/api-keys/revoke is not {id}.
        pattern = "^" + re.sub(r"\\\{[^/]+\\\}", "[^/]+", re.escape(path)) + "$"
        for method, op in item.items():
            if isinstance(op, dict) and "operationId" in op:
                ops.append((path.count("{"), method.upper(), re.compile(pattern), op["operationId"]))
                codes = [int(c) for c in op["responses"] if str(c).startswith("2")]
                success[op["operationId"]] = codes[0] if len(codes) == 1 else None
    return [(m, r, o) for _, m, r, o in sorted(ops, key=lambda t: t[0])], success


def main(argv):
    spec = yaml.safe_load(open(argv[1]))
    ops, success = operations(spec)
    seen = collections.defaultdict(collections.Counter)
    for har in argv[2:]:
        for entry in json.load(open(har))["log"]["entries"]:
            method = entry["request"]["method"]
            path = urlsplit(entry["request"]["url"]).path
            op = next((o for m, r, o in ops if m == method and r.match(path)), None)
            if op is not None:
                seen[op][entry["response"]["status"]] += 1
    failed = False
    print("schemathesis: cases that reached each operation's success status")
    for op in sorted(set(seen) | set(FLOORS)):
        statuses = seen.get(op, collections.Counter())
        total = sum(statuses.values())
        if op in FLOORS:
            status, floor = success.get(op), FLOORS[op]
            if status is None:
                print(f"  {op:16} FAILED: not one 2xx answer in the spec to count")
                failed = True
                continue
            ok = statuses[status]
            verdict = "ok" if ok >= floor else f"FAILED: fewer than {floor}"
            failed |= ok < floor
            print(f"  {op:16} {ok:4} of {total:4} answered {status}  {verdict}")
        else:
            print(f"  {op:16} {total:4} cases, not gated  {dict(sorted(statuses.items()))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
