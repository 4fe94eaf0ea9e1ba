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

# operationId -> (success status, the fewest cases that must reach it). The floors sit well
# under what a run reaches (see tests/README.md); they catch an operation that stopped being
# exercised, not a bad draw. redigestKey is not listed: a success needs an HMAC proof under
# the server's secret, which only a gateway can make (tests/redigest.rs covers it).
FLOORS = {
    "healthz": (200, 1),
    "readyz": (200, 1),
    "metrics": (200, 1),
    "jwks": (200, 1),
    "listKeys": (200, 10),
    "createKey": (201, 10),
    "getKey": (200, 5),
    "updateKey": (200, 10),
    "revokeKey": (200, 5),
    "rotateKey": (201, 3),
    "abortRotation": (200, 1),
    "massRevoke": (200, 1),
    "lookupKey": (200, 3),
    "verifyKey": (200, 3),
    "getKeyUsage": (200, 5),
    "listAdminTokens": (200, 1),
    "exchangeToken": (201, 5),
}


def operations(spec):
    """(method, compiled path regex, operationId) for every operation of the spec."""
    ops = []
    for path, item in spec["paths"].items():
        # Literal segments sort before templated ones so /v1/api-keys/revoke is not {id}.
        pattern = "^" + re.sub(r"\\\{[^/]+\\\}", "[^/]+", re.escape(path)) + "$"
        for method, op in item.items():
            if isinstance(op, dict) and "operationId" in op:
                ops.append((path.count("{"), method.upper(), re.compile(pattern), op["operationId"]))
    return [(m, r, o) for _, m, r, o in sorted(ops, key=lambda t: t[0])]


def main(argv):
    spec = yaml.safe_load(open(argv[1]))
    ops = operations(spec)
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
            status, floor = FLOORS[op]
            ok = statuses[status]
            verdict = "ok" if ok >= floor else f"FAILED: fewer than {floor}"
            failed |= ok < floor
            print(f"  {op:16} {ok:4} of {total:4} answered {status}  {verdict}")
        else:
            print(f"  {op:16} {total:4} cases, not gated  {dict(sorted(statuses.items()))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
