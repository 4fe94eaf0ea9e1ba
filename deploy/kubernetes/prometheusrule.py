#!/usr/bin/env python3
"""The fleet overlay's PrometheusRule is deploy/prometheus/alerts.yaml's groups, unchanged.

  prometheusrule.py check   fail (exit 1) when overlays/fleet/prometheusrule.yaml differs
  prometheusrule.py write   regenerate it from alerts.yaml

deploy/check.sh runs `check`, so the rules Prometheus Operator loads never drift from the
ones promtool checks and unit-tests.
"""
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parent / "prometheus" / "alerts.yaml"
RULE = HERE / "overlays" / "fleet" / "prometheusrule.yaml"
HEADER = """\
# GENERATED from deploy/prometheus/alerts.yaml by deploy/kubernetes/prometheusrule.py write;
# do not edit: deploy/check.sh fails when the two differ.
"""


class Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as literal blocks, as in alerts.yaml."""


Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def expected():
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "keygate",
            "labels": {"app.kubernetes.io/name": "keygate"},
        },
        "spec": {"groups": groups},
    }


def main(mode):
    want = expected()
    if mode == "write":
        RULE.write_text(HEADER + yaml.dump(want, Dumper=Dumper, sort_keys=False, width=100))
        print(f"  wrote {RULE.relative_to(HERE.parent)}")
        return 0
    have = yaml.safe_load(RULE.read_text()) if RULE.exists() else None
    if have != want:
        print(f"  ERROR: {RULE.relative_to(HERE.parent)} differs from prometheus/alerts.yaml;"
              " run: python3 deploy/kubernetes/prometheusrule.py write", file=sys.stderr)
        return 1
    n = sum(len(g["rules"]) for g in want["spec"]["groups"])
    print(f"  OK  PrometheusRule = prometheus/alerts.yaml ({n} rules)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "check"))
