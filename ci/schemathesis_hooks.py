"""Schemathesis hooks for ci/schemathesis.sh: the spec narrowed to the fuzzed deployment.

docs/openapi.yaml describes every deployment, so what depends on the config is only in its
descriptions: which envs and plans exist, whether an owner is required, whether quotas are
counted (they need `[redis]`), how long a key may live. Generated bodies that guess these get
a 400 or 422 and never reach the code behind them. This hook states them for the control
plane the script starts, from the environment the script sets:

  ST_ENVS          comma-separated `[keys] envs`
  ST_PLANS         comma-separated `[plans.*]` names
  ST_REQUIRE_OWNER 1 when `[policy] require_owner`
  ST_QUOTAS        1 when the config has `[redis]` (quotas are counted)
  ST_PATH_ID       set for a run of one operation on an id the generator cannot guess (a
                   rotation's successor, the seed key): every case's `{id}` is this one

Only request bodies are narrowed; responses are still checked against the spec's own schemas.
A missing variable (but ST_PATH_ID) is an error (KeyError), never a silent default.
"""

import os

import schemathesis


def _list(name):
    return [v for v in os.environ[name].split(",") if v]


@schemathesis.hook
def before_load_schema(ctx, raw_schema):
    schemas = raw_schema["components"]["schemas"]
    envs, plans = _list("ST_ENVS"), _list("ST_PLANS")
    create, update = schemas["CreateKey"], schemas["UpdateKey"]
    create["properties"]["env"]["enum"] = envs + [None]
    for body in (create, update):
        body["properties"]["plan"]["enum"] = plans + [None]
        # `expires_in` at most max_ttl (365d in the script's config): 1-99 of any unit but
        # weeks stays under it.
        body["properties"]["expires_in"]["pattern"] = "^[1-9][0-9]?(s|m|h|d)$"
        if os.environ["ST_QUOTAS"] != "1":
            # Without [redis] any quota is a 400: generate none (negative cases still may).
            del body["properties"]["quota"]
    if os.environ["ST_REQUIRE_OWNER"] == "1":
        create["required"] = sorted(set(create["required"]) | {"owner"})
        create["properties"]["owner"] = {"type": "string", "pattern": "\\S", "maxLength": 256}


@schemathesis.hook
def map_path_parameters(ctx, path_parameters):
    fixed = os.environ.get("ST_PATH_ID")
    if fixed and path_parameters and "id" in path_parameters:
        path_parameters["id"] = fixed
    return path_parameters
