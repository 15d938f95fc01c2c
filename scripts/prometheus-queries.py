#!/usr/bin/env python3
"""Evaluates every expression of the Grafana dashboard, and every metric the
alert rules name, against a running Prometheus: each must return data, so a
misspelt or vanished metric name fails CI. Standard library only.

  python3 scripts/prometheus-queries.py http://127.0.0.1:9090 \
      deploy/grafana/sluicegate.json deploy/prometheus/alerts.yml
"""
import json
import re
import sys
import urllib.parse
import urllib.request

METRIC = re.compile(r"\b((?:sluicegate|process)_[a-z_]+)\b")


def query(base, expr):
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as res:
        doc = json.load(res)
    if doc.get("status") != "success":
        return None, doc.get("error", "?")
    return doc["data"]["result"], None


def dashboard_exprs(path):
    doc = json.load(open(path))
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for annotation in doc.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            # An annotation fires on changes: check the series it reads.
            for name in METRIC.findall(annotation["expr"]):
                yield "annotation " + annotation["name"], name


def rule_exprs(path):
    """(alert, expr) of each rule; `expr:` on one line or as a `|` block."""
    lines = open(path).read().splitlines()
    alert = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"\s*- alert:\s*(\S+)", line)
        if m:
            alert = m.group(1)
        m = re.match(r"(\s*)expr:\s*(.*)$", line)
        if m:
            indent, rest = len(m.group(1)), m.group(2).strip()
            if rest in ("|", ">", "|-", ">-"):
                block = []
                i += 1
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                    block.append(lines[i].strip())
                    i += 1
                yield alert, " ".join(block)
                continue
            yield alert, rest
        i += 1


def concrete(expr):
    return (
        expr.replace("$__rate_interval", "1m")
        .replace('=~"$route"', '=~".*"')
        .replace('=~"$job"', '=~".*"')
    )


def main():
    base, dashboard, rules = sys.argv[1:4]
    failed = 0
    checked = 0
    for title, expr in dashboard_exprs(dashboard):
        result, error = query(base, concrete(expr))
        checked += 1
        if not result:
            failed += 1
            print(f"FAIL dashboard '{title}': {expr}: {error or 'no data'}")
    names = sorted({n for _, e in rule_exprs(rules) for n in METRIC.findall(e)})
    for name in names:
        result, error = query(base, f'count({{__name__="{name}"}})')
        checked += 1
        if not result:
            failed += 1
            print(f"FAIL alert rules: metric {name}: {error or 'no series'}")
    print(f"{checked} queries, {failed} without data")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
