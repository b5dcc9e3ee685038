#!/usr/bin/env python3
"""Offline checks of deploy/: the Helm chart, the alert rules and the Grafana dashboard.

    python3 deploy/check.py [--bless]      (or: cargo xtask deploy-check [--bless])

One line per check; exits 1 when any fails. No cluster, no network, no helm binary: Helm's engine comes
from helm-python-sdk, schemas from kubernetes-validate, rule checks from promtool (`cargo xtask setup`
installs all three). --bless rewrites the golden renders from the chart instead of comparing them.
"""

from __future__ import annotations

import ast
import copy
import difflib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy/charts/eks-pod-identity-agent"
GOLDEN = CHART / "tests/golden"
ORIGINAL_VALUES = CHART / "tests/compat/original-values.yaml"  # an operator values file in the original schema
ORIGINAL_RENDERS = ROOT / "tests/fixtures/original-chart"
ALERTS = ROOT / "deploy/prometheus/alerts.yaml"
ALERTS_TEST = ROOT / "deploy/prometheus/alerts_test.yaml"
DASHBOARD = ROOT / "deploy/grafana/eks-pod-identity-agent.json"
METRICS_SOURCE = ROOT / "agent/src/metrics.rs"

# What the original's fixtures were rendered with (and what the add-on uses).
RELEASE = "eks-pod-identity-agent"
NAMESPACE = "kube-system"
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0")
# prometheus-operator kinds: no schema in kubernetes-validate; checked for shape only.
CRD_GROUP = "monitoring.coreos.com/"
# Labels that name the chart's version: expected to differ from the original's.
VERSION_LABELS = {"helm.sh/chart", "app.kubernetes.io/version"}
# Grafana's variables, replaced by something PromQL accepts before promtool parses a panel's query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${instance:regex}": ".*",
    "$instance": ".*",
    "$job": ".*",
}

failures: list[str] = []


def report(name: str, problem: str | None, detail: str = "") -> None:
    """One line per check; a problem marks the run failed."""
    if problem is None:
        print(f"deploy-check: ok   {name}{': ' + detail if detail else ''}")
    else:
        failures.append(name)
        print(f"deploy-check: FAIL {name}: {problem}")


def run(cmd: list[str]) -> str | None:
    """Runs a tool; None when it succeeds, else its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return None if done.returncode == 0 else (done.stdout + done.stderr).strip()


def render(values: dict) -> dict[str, str]:
    """{template path: manifest} of the chart, as `helm install` would render it."""
    with chart.Chart.load(CHART) as loaded:
        return loaded.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def as_text(manifests: dict[str, str]) -> str:
    """The manifests as `helm template` prints them: each document after `---` and a Source line."""
    out = []
    for path in sorted(manifests):
        if path.endswith("NOTES.txt"):
            continue
        for doc in re.split(r"(?m)^---[ \t]*$", manifests[path]):
            if doc.strip():
                out.append(f"---\n# Source: {path}\n{doc.strip()}\n")
    return "".join(out)


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def deep_merge(base: dict, over: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def case_values() -> dict[str, dict]:
    return {
        p.name.removesuffix(".values.yaml"): yaml.safe_load(p.read_text()) or {}
        for p in sorted(GOLDEN.glob("*.values.yaml"))
    }


def check_versions() -> None:
    """The chart's appVersion is the default image tag: it must be the agent's version."""
    workspace = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    app = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    report(
        "chart appVersion",
        None if str(app) == workspace else f"Chart.yaml appVersion {app} != workspace version {workspace}",
        str(app),
    )


def check_lint(cases: dict[str, dict]) -> None:
    for name, values in [("defaults", None), *cases.items()]:
        result = chart.lint(CHART, values, strict=False)
        errors = list(result.get("errors") or []) + [
            f"{m['path']}: {m['error']}" for m in result.get("messages") or [] if m.get("severity", 0) >= 3
        ]
        report(f"helm lint ({name})", "; ".join(errors) if errors else None)


def check_golden(cases: dict[str, dict], bless: bool) -> dict[str, str]:
    """Renders every case and compares it with its golden file (or rewrites it)."""
    rendered = {}
    for name, values in cases.items():
        header = (
            f"# Golden render of deploy/charts/eks-pod-identity-agent with {name}.values.yaml\n"
            f"# (release {RELEASE}, namespace {NAMESPACE}). Rewrite: cargo xtask deploy-check --bless\n"
        )
        try:
            text = header + as_text(render(values))
        except Exception as e:  # noqa: BLE001 - Helm's errors have many types; report any.
            report(f"render {name}", str(e))
            continue
        rendered[name] = text
        golden = GOLDEN / f"{name}.yaml"
        if bless:
            golden.write_text(text)
            report(f"golden {name}", None, f"rewrote {golden.relative_to(ROOT)}")
            continue
        want = golden.read_text() if golden.exists() else ""
        if want == text:
            report(f"golden {name}", None)
        else:
            diff = "".join(
                difflib.unified_diff(
                    want.splitlines(keepends=True),
                    text.splitlines(keepends=True),
                    f"{golden.relative_to(ROOT)} (golden)",
                    f"{name} (rendered now)",
                )
            )
            report(
                f"golden {name}",
                f"the render differs from {golden.relative_to(ROOT)} "
                f"(if intended: cargo xtask deploy-check --bless)\n{diff}",
            )
    return rendered


def check_schemas(rendered: dict[str, str]) -> None:
    """Core objects against Kubernetes' schemas (strict: unknown fields fail); CRD objects for shape."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in rendered.items():
            core, custom = [], []
            for doc in documents(text):
                (custom if str(doc.get("apiVersion", "")).startswith(CRD_GROUP) else core).append(doc)
            malformed = [
                f"{d.get('kind')}/{(d.get('metadata') or {}).get('name')}"
                for d in custom
                if not (d.get("kind") and (d.get("metadata") or {}).get("name") and isinstance(d.get("spec"), dict))
            ]
            if custom:
                report(f"prometheus-operator objects {name}", "malformed: " + ", ".join(malformed) if malformed else None,
                       ", ".join(sorted(d["kind"] for d in custom)))
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump_all(core))
            for version in KUBERNETES_VERSIONS:
                problem = run(["kubernetes-validate", "--strict", "--quiet", "-k", version, str(path)])
                report(f"kubernetes-validate {version} {name}", problem, f"{len(core)} objects")


def unversioned(labels: dict) -> dict:
    return {k: v for k, v in labels.items() if k not in VERSION_LABELS}


def check_original_compat() -> None:
    """An original values file works unchanged, and gives the DaemonSets the original's names, labels and
    selectors (so that an upgrade from the original chart replaces them in place)."""
    defaults = yaml.safe_load(ORIGINAL_VALUES.read_text())
    fixtures = sorted(ORIGINAL_RENDERS.glob("*.yaml"))
    if not fixtures:
        report("original chart compatibility", f"no fixtures in {ORIGINAL_RENDERS.relative_to(ROOT)}")
    for fixture in fixtures:
        text = fixture.read_text()
        found = re.search(r"^# .*values: (\{.*\})$", text, re.MULTILINE)
        if not found:
            report(f"original chart compatibility {fixture.stem}", "no `values: {...}` line in its header")
            continue
        values = deep_merge(defaults, ast.literal_eval(found.group(1)))
        theirs = {d["metadata"]["name"]: d for d in documents(text) if d.get("kind") == "DaemonSet"}
        try:
            ours = {d["metadata"]["name"]: d for d in documents(as_text(render(values))) if d.get("kind") == "DaemonSet"}
        except Exception as e:  # noqa: BLE001
            report(f"original chart compatibility {fixture.stem}", f"render failed: {e}")
            continue
        problems = []
        if sorted(ours) != sorted(theirs):
            problems.append(f"DaemonSets {sorted(ours)} != the original's {sorted(theirs)}")
        for name in sorted(set(ours) & set(theirs)):
            o, t = ours[name], theirs[name]
            if o["metadata"]["namespace"] != t["metadata"]["namespace"]:
                problems.append(f"{name}: namespace {o['metadata']['namespace']} != {t['metadata']['namespace']}")
            if unversioned(o["metadata"]["labels"]) != unversioned(t["metadata"]["labels"]):
                problems.append(f"{name}: labels {o['metadata']['labels']} != {t['metadata']['labels']}")
            if o["spec"]["selector"] != t["spec"]["selector"]:
                problems.append(f"{name}: selector {o['spec']['selector']} != {t['spec']['selector']}")
            pod_labels = o["spec"]["template"]["metadata"]["labels"]
            missing = {k: v for k, v in t["spec"]["template"]["metadata"]["labels"].items() if pod_labels.get(k) != v}
            if missing:
                problems.append(f"{name}: pod labels lack {missing}")
        report(f"original chart compatibility {fixture.stem}", "; ".join(problems) or None, ", ".join(sorted(ours)))


def known_metrics() -> set[str]:
    """The metric names the agent registers (agent/src/metrics.rs), with histograms' series."""
    names = set(re.findall(r'"(pod_identity_[a-z0-9_]+)"', METRICS_SOURCE.read_text()))
    return names | {f"{n}{s}" for n in names if n.endswith("_seconds") for s in ("_bucket", "_count", "_sum")}


def unknown_metrics(exprs: list[str], known: set[str]) -> set[str]:
    return {m for e in exprs for m in re.findall(r"\bpod_identity_[a-z0-9_]+", e)} - known


def check_alerts(rendered: dict[str, str], known: set[str]) -> None:
    report("promtool check rules", run(["promtool", "check", "rules", str(ALERTS)]))
    report("promtool test rules", run(["promtool", "test", "rules", str(ALERTS_TEST)]))

    rules = yaml.safe_load(ALERTS.read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    unknown = unknown_metrics([r["expr"] for r in alerts], known)
    report("alert metric names", f"not exported by the agent: {sorted(unknown)}" if unknown else None)

    # Every alert fires in one test case and stays quiet in another.
    cases = [c for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for c in t.get("alert_rule_test", [])]
    untested = [
        a["alert"]
        for a in alerts
        if not any(c["alertname"] == a["alert"] and c.get("exp_alerts") for c in cases)
        or not any(c["alertname"] == a["alert"] and not c.get("exp_alerts") for c in cases)
    ]
    report("alert tests cover every alert", f"without a firing and a quiet case: {untested}" if untested else None,
           f"{len(alerts)} alerts")

    # One source: the chart's PrometheusRule carries exactly the rule file's groups.
    rule_objects = [d for text in rendered.values() for d in documents(text) if d.get("kind") == "PrometheusRule"]
    if not rule_objects:
        report("PrometheusRule = alerts.yaml", "no golden case enables metrics.prometheusRule")
    else:
        differ = [d["metadata"]["name"] for d in rule_objects if d["spec"] != rules]
        report("PrometheusRule = alerts.yaml", f"differs in {differ}" if differ else None)


def dashboard_queries(node: object) -> list[str]:
    """Every `expr` of every panel target, rows and nested panels included."""
    found = []
    if isinstance(node, dict):
        for target in node.get("targets") or []:
            if target.get("expr"):
                found.append(target["expr"])
        for child in node.get("panels") or []:
            found += dashboard_queries(child)
    return found


def check_dashboard(known: set[str]) -> None:
    try:
        dashboard = json.loads(DASHBOARD.read_text())
    except ValueError as e:
        report("dashboard JSON", str(e))
        return
    queries = dashboard_queries(dashboard)
    if not queries:
        report("dashboard queries parse", "no panel queries found")
        return
    rules, left = [], set()
    for i, query in enumerate(queries):
        for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            query = query.replace(variable, value)
        left.update(re.findall(r"\$\{?\w+", query))
        rules.append({"record": f"dashboard:query_{i}", "expr": query})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        f.flush()
        problem = run(["promtool", "check", "rules", f.name])
    if left:
        problem = f"variables without a substitute in check.py: {sorted(left)}" + (f"\n{problem}" if problem else "")
    report("dashboard queries parse", problem, f"{len(queries)} queries")
    unknown = unknown_metrics(queries, known)
    report("dashboard metric names", f"not exported by the agent: {sorted(unknown)}" if unknown else None)


def main() -> int:
    bless = "--bless" in sys.argv[1:]
    unknown_args = [a for a in sys.argv[1:] if a != "--bless"]
    if unknown_args:
        print(f"usage: {sys.argv[0]} [--bless] (unknown: {' '.join(unknown_args)})", file=sys.stderr)
        return 2
    cases = case_values()
    check_versions()
    check_lint(cases)
    rendered = check_golden(cases, bless)
    check_schemas(rendered)
    check_original_compat()
    known = known_metrics()
    check_alerts(rendered, known)
    check_dashboard(known)
    if failures:
        print(f"deploy-check: {len(failures)} failed: {', '.join(failures)}")
        return 1
    print("deploy-check: all passed")
    return 0


if __name__ == "__main__":
    missing = [tool for tool in ("promtool", "kubernetes-validate") if shutil.which(tool) is None]
    try:
        import yaml
        from helm_python import chart
    except ImportError as e:
        missing.append(f"python module {e.name}")
    if missing:
        print(f"deploy-check: FAIL tools missing: {', '.join(missing)}; run `cargo xtask setup`")
        sys.exit(1)
    sys.exit(main())
