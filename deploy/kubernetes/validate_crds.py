#!/usr/bin/env python3
"""Strict validation of the Prometheus Operator resources in rendered manifests.

kubernetes-validate ships schemas for built-in kinds only: for a ServiceMonitor or a
PrometheusRule it prints "Couldn't find schema" and passes. This validates those kinds
against prometheus-operator's own API types (the pydantic models of PyPI
`cloudcoil-models-prometheus-operator`, generated from its CRDs), made strict the way
`kubernetes-validate --strict` is: an unknown field anywhere is an error (pydantic ignores
extra fields by default; every model is switched to extra="forbid" and rebuilt, leaves
first, so the parents pick up their children's strict schemas).

  validate_crds.py RENDERED.yaml...   exit 1 on any error, naming kind/name and the field
"""
import sys
import typing

import pydantic
import yaml
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
         ("monitoring.coreos.com/v1", "PrometheusRule"): PrometheusRule}


def models_in(annotation):
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from models_in(arg)


def make_strict(roots):
    """Post-order over the models reachable from `roots`: children rebuilt before parents."""
    order, seen = [], set()

    def visit(m):
        if m in seen:
            return
        seen.add(m)
        for f in m.model_fields.values():
            for child in models_in(f.annotation):
                visit(child)
        order.append(m)

    for r in roots:
        visit(r)
    for m in order:
        m.model_config["extra"] = "forbid"
    for m in order:
        m.model_rebuild(force=True)
    return len(order)


def main(paths):
    n_models = make_strict(KINDS.values())
    errors = checked = 0
    for path in paths:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for d in docs:
            model = KINDS.get((d.get("apiVersion"), d.get("kind")))
            if model is None:
                continue
            name = f"{d['kind']}/{d.get('metadata', {}).get('name')}"
            try:
                model.model_validate(d)
                checked += 1
            except pydantic.ValidationError as e:
                errors += 1
                for err in e.errors():
                    where = ".".join(str(p) for p in err["loc"])
                    print(f"  ERROR {path}: {name}: {where}: {err['msg']}", file=sys.stderr)
    print(f"  OK  {checked} Prometheus Operator resources valid (strict, {n_models} types)"
          if not errors else f"  {errors} invalid Prometheus Operator resources")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
