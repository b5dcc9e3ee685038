#!/usr/bin/env python3
"""Offline checks of deploy/: the Helm chart, the alert rules, the Grafana dashboard and the audit
log's shipping configuration.

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
SHIPPING_VECTOR = ROOT / "deploy/shipping/vector.yaml"
DASHBOARD = ROOT / "deploy/grafana/eks-pod-identity-agent.json"
RUNBOOKS = ROOT / "deploy/runbooks.md"
# Every alert's runbook_url, as alerts.yaml writes it: a path in the repository, before
# metrics.prometheusRule.runbookBaseUrl.
RUNBOOK_PATH = "deploy/runbooks.md"
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
    "$cluster": ".*",
    "$job": ".*",
}

failures: list[str] = []
APP_VERSION = ""  # Chart.yaml's appVersion, read in main()


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
    app = APP_VERSION
    report(
        "chart appVersion",
        None if str(app) == workspace else f"Chart.yaml appVersion {app} != workspace version {workspace}",
        str(app),
    )


def daemonset(manifests: dict[str, str], name: str = RELEASE) -> dict:
    """The DaemonSet `name` of a render."""
    return next(d for d in documents(as_text(manifests)) if d.get("kind") == "DaemonSet" and d["metadata"]["name"] == name)


def render_error(values: dict) -> str | None:
    """Helm's error when the chart refuses these values, None when it renders."""
    try:
        render(values)
    except Exception as e:  # noqa: BLE001 - Helm's errors have many types.
        return str(e)
    return None


def check_image(cases: dict[str, dict]) -> None:
    """No phantom image: without image.override or image.repository the chart refuses to render, naming
    image.override, instead of composing a reference that exists nowhere. The original chart names AWS's Go
    agent with containerRegistry and tag alone (<registry>/eks/eks-pod-identity-agent:<tag>); an operator's
    original values file (ORIGINAL_VALUES, whole) without an image of ours must fail, not render
    <registry>/eks-pod-identity-agent:<their tag>."""
    original = yaml.safe_load(ORIGINAL_VALUES.read_text())
    without_ours = copy.deepcopy(original)
    without_ours["image"].pop("override", None)
    registry = without_ours["image"]["containerRegistry"]
    for name, values, must_name in [
        ("original values file without image.override", without_ours, ["image.override", registry]),
        ("the chart's defaults", {"clusterName": "c"}, ["image.override"]),
    ]:
        error = render_error(values)
        if error is None:
            problem = "rendered, with image " + daemonset(render(values))["spec"]["template"]["spec"]["containers"][0]["image"]
        else:
            missing = [m for m in must_name if m not in error]
            problem = f"the error does not name {missing}: {error}" if missing else None
        report(f"no phantom image: {name}", problem, "refused, naming " + ", ".join(must_name))
    # And what an operator sets is what the pods run.
    base = cases.get("cloud", {})
    for image, want in [
        ({"override": "registry.example.com/agent:1.2.3"}, "registry.example.com/agent:1.2.3"),
        ({**without_ours["image"], "override": "registry.example.com/agent:1.2.3"}, "registry.example.com/agent:1.2.3"),
        ({"containerRegistry": "registry.example.com/", "repository": "team/agent"}, f"registry.example.com/team/agent:{APP_VERSION}"),
        ({"repository": "registry.example.com/agent", "tag": "1.2.3"}, "registry.example.com/agent:1.2.3"),
    ]:
        try:
            spec = daemonset(render({**base, "image": image}))["spec"]["template"]["spec"]
            got = {c["image"] for c in spec["containers"] + spec.get("initContainers", [])}
            problem = None if got == {want} else f"images {sorted(got)}, want {want}"
        except Exception as e:  # noqa: BLE001
            problem = f"render failed: {e}"
        report(f"image {image}", problem, want)


def check_empty_values(cases: dict[str, dict]) -> None:
    """An empty value clears the chart's default, as Helm users expect of `resources: {}` (Helm merges a
    user's map into the chart's, so the chart keeps such defaults out of values.yaml). Each case: the field
    is there by default (where the chart has a default) and gone with the empty value."""
    base = cases.get("cloud", {})
    pod = lambda d: d["spec"]["template"]["spec"]  # noqa: E731
    server = lambda d: pod(d)["containers"][0]  # noqa: E731
    init = lambda d: pod(d)["initContainers"][0]  # noqa: E731
    empty_cases = [
        ({"resources": {}}, "server container's resources", lambda d: server(d).get("resources"), True),
        ({"tolerations": []}, "tolerations", lambda d: pod(d).get("tolerations"), True),
        ({"affinity": {}}, "affinity", lambda d: pod(d).get("affinity"), True),
        ({"podAnnotations": {}}, "pod annotations", lambda d: d["spec"]["template"]["metadata"].get("annotations"), True),
        ({"nodeSelector": {}}, "nodeSelector", lambda d: pod(d).get("nodeSelector"), False),
        ({"imagePullSecrets": []}, "imagePullSecrets", lambda d: pod(d).get("imagePullSecrets"), False),
        ({"podLabels": {}}, "pod labels beyond the selector's",
         lambda d: {k: v for k, v in d["spec"]["template"]["metadata"]["labels"].items() if not k.startswith("app.kubernetes.io/")}, False),
        ({"agent": {"additionalArgs": {}}}, "server -v flag", lambda d: "-v" in server(d)["args"], False),
        ({"init": {"additionalArgs": {}}}, "init container's args", lambda d: init(d).get("args"), False),
    ]
    defaults = daemonset(render(base))
    for patch, what, field, has_default in empty_cases:
        try:
            got = field(daemonset(render(deep_merge(base, patch))))
        except Exception as e:  # noqa: BLE001
            report(f"empty value clears {what}", f"render failed: {e}")
            continue
        problems = []
        if has_default and not field(defaults):
            problems.append("the chart has no default for it to clear")
        if got:
            problems.append(f"still rendered: {got}")
        report(f"empty value clears {what}", "; ".join(problems) or None, json.dumps(patch))

    # A map of the user's is merged into those defaults, as Helm merges values (and a null drops a key).
    for patch, what, field, want in [
        ({"resources": {"requests": {"cpu": "50m"}}}, "resources", lambda d: server(d)["resources"],
         {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}),
        ({"resources": {"limits": None}}, "resources", lambda d: server(d)["resources"],
         {"requests": {"cpu": "25m", "memory": "32Mi"}}),
        ({"podAnnotations": {"example.com/team": "platform"}}, "pod annotations",
         lambda d: d["spec"]["template"]["metadata"]["annotations"],
         {"example.com/team": "platform", "prometheus.io/port": "2705", "prometheus.io/scrape": "true"}),
    ]:
        got = field(daemonset(render(deep_merge(base, patch))))
        report(f"a map merges into the default {what}", None if got == want else f"got {got}, want {want}", json.dumps(patch))


def check_metrics_port(cases: dict[str, dict]) -> None:
    """As in the original chart: the `metrics` container port (a host port, on the host network) only
    when metrics are enabled, and then no Service or monitors selecting it; the probes ask the probe
    port, so they do not depend on it."""
    base = cases.get("cloud", {})
    for enabled in (True, False):
        values = deep_merge(base, {"metrics": {"enabled": enabled, "podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}})
        manifests = render(values)
        ds = daemonset(manifests)
        container = ds["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        kinds = sorted(d["kind"] for d in documents(as_text(manifests)) if d["kind"] != "DaemonSet")
        problems = []
        if ("metrics" in ports) != enabled:
            problems.append(f"container ports {ports}")
        if enabled != bool({"Service", "ServiceMonitor", "PodMonitor"} & set(kinds)):
            problems.append(f"objects {kinds}")
        for probe in ("livenessProbe", "readinessProbe"):
            if container[probe]["httpGet"]["port"] != "probes-port" or "probes-port" not in ports:
                problems.append(f"{probe} asks {container[probe]['httpGet']['port']}")
        report(f"metrics port declared only when enabled (metrics.enabled={enabled})", "; ".join(problems) or None,
               f"ports {sorted(ports)}, objects {kinds}")


# Values that map to an agent flag, rendered only when set so that the agent's default applies otherwise:
# (values, the flag, the argument).
FLAG_VALUES = [
    ({"agent": {"eksAuth": {"connectTimeout": "2s"}}}, "--eks-auth-connect-timeout", "2s"),
    ({"agent": {"eksAuth": {"attemptTimeout": "1500ms"}}}, "--eks-auth-attempt-timeout", "1500ms"),
    ({"agent": {"eksAuth": {"callTimeout": "10s"}}}, "--eks-auth-call-timeout", "10s"),
    ({"attribution": {"maxPods": 250}}, "--max-pods", "250"),
    ({"attribution": {"auditLog": {"format": "ocsf"}}}, "--audit-format", "ocsf"),
    ({"metrics": {"address": "::"}}, "--metrics-address", "::"),
    ({"tokenValidation": {"audience": "delegate.example"}}, "--token-audience", "delegate.example"),
]


def rendered_pod(values: dict) -> tuple[list[dict], dict, list[str]]:
    """Every object of a render, its DaemonSet's pod spec, and the agent's arguments."""
    objects = documents(as_text(render(values)))
    pod = next(d for d in objects if d.get("kind") == "DaemonSet")["spec"]["template"]["spec"]
    return objects, pod, pod["containers"][0]["args"]


def mode_problems(pod: dict, args: list[str], flag: str, mode: object, on: bool) -> list[str]:
    """A mode value (`False`: YAML's bare `off`) passed as its flag, and the token mounted when it is on."""
    want = "off" if mode is False else mode
    problems = []
    if [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag] != [want]:
        problems.append(f"{flag} not {want}: {args}")
    if pod.get("automountServiceAccountToken") != on:
        problems.append(f"automountServiceAccountToken {pod.get('automountServiceAccountToken')}")
    return problems


def check_token_validation(cases: dict[str, dict]) -> None:
    """Token validation's RBAC, token and state volume come with it, and go with `mode: off`."""
    # Without the pod view, which needs the token too.
    base = deep_merge(cases.get("cloud", {}), {"podView": {"mode": "off"}})
    for mode, validating in (("auto", True), ("on", True), ("off", False), (False, False)):
        objects, pod, args = rendered_pod(deep_merge(base, {"tokenValidation": {"mode": mode}}))
        mounts = {m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        bindings = [o for o in objects if o.get("kind") == "ClusterRoleBinding"
                    and o["roleRef"]["name"] == "system:service-account-issuer-discovery"]
        problems = mode_problems(pod, args, "--token-validation", mode, validating)
        if (len(bindings) == 1) != validating:
            problems.append(f"{len(bindings)} issuer-discovery bindings")
        if (("state" in mounts and "state" in volumes and "--state-dir" in args)) != validating:
            problems.append(f"state volume {sorted(volumes)} / mounts {sorted(mounts)}")
        if validating and volumes["state"]["hostPath"]["path"] != "/var/lib/eks-pod-identity-agent":
            problems.append(f"state hostPath {volumes['state']['hostPath']}")
        report(f"tokenValidation.mode={mode}: RBAC, token and state volume", "; ".join(problems) or None)


def check_pod_view(cases: dict[str, dict]) -> None:
    """The pod view's RBAC (get, list and watch on pods) and token come with it, and go with `mode: off`."""
    base = deep_merge(cases.get("cloud", {}), {"tokenValidation": {"mode": "off"}})
    for mode, viewing in (("auto", True), ("on", True), ("off", False), (False, False)):
        objects, pod, args = rendered_pod(deep_merge(base, {"podView": {"mode": mode}}))
        rules = [r for o in objects if o.get("kind") == "ClusterRole" for r in o.get("rules") or []]
        pods = [r for r in rules if r.get("resources") == ["pods"]]
        problems = mode_problems(pod, args, "--pod-view", mode, viewing)
        if viewing and (len(pods) != 1 or pods[0]["verbs"] != ["get", "list", "watch"]):
            problems.append(f"pods rules {pods}")
        if not viewing and pods:
            problems.append(f"pods rules without the view: {pods}")
        report(f"podView.mode={mode}: RBAC on pods and token", "; ".join(problems) or None)


def check_flag_values(cases: dict[str, dict]) -> None:
    base = cases.get("cloud", {})
    default_args = daemonset(render(base))["spec"]["template"]["spec"]["containers"][0]["args"]
    for patch, flag, value in FLAG_VALUES:
        args = daemonset(render(deep_merge(base, patch)))["spec"]["template"]["spec"]["containers"][0]["args"]
        pairs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
        problems = []
        if flag in default_args:
            problems.append(f"{flag} rendered without the value")
        if pairs != [value]:
            problems.append(f"with the value, {flag} is given {pairs}, want [{value!r}]")
        report(f"value {json.dumps(patch)} -> {flag}", "; ".join(problems) or None)


def check_lint(cases: dict[str, dict]) -> None:
    # The defaults name no image (check_image): lint them with one, or lint would only see the `fail`.
    defaults = {"image": {"override": "registry.example.com/eks-pod-identity-agent:lint"}}
    for name, values in [("defaults", defaults), *cases.items()]:
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
            # The SELinux label (hybrid-bottlerocket: spc_t) on both of our containers, as on the original's
            # server container (its init container is privileged; ours is not, so it needs the label too).
            label = (t["spec"]["template"]["spec"]["containers"][0].get("securityContext") or {}).get("seLinuxOptions")
            spec = o["spec"]["template"]["spec"]
            for container in spec["containers"] + spec.get("initContainers", []):
                if (container.get("securityContext") or {}).get("seLinuxOptions") != label:
                    problems.append(f"{name}/{container['name']}: seLinuxOptions "
                                    f"{(container.get('securityContext') or {}).get('seLinuxOptions')} != the original's {label}")
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

    check_runbooks(alerts)

    # One source: the chart's PrometheusRule carries exactly the rule file's groups (with the case's
    # runbookBaseUrl in front of the runbook paths).
    cases = case_values()
    compared = 0
    for name, text in rendered.items():
        for rule in (d for d in documents(text) if d.get("kind") == "PrometheusRule"):
            base = ((cases.get(name, {}).get("metrics") or {}).get("prometheusRule") or {}).get("runbookBaseUrl")
            want = yaml.safe_load(with_runbook_base(ALERTS.read_text(), base))
            compared += 1
            report(f"PrometheusRule = alerts.yaml ({name})", "differs" if rule["spec"] != want else None,
                   f"runbook base {base}" if base else "")
    if not compared:
        report("PrometheusRule = alerts.yaml", "no golden case enables metrics.prometheusRule")


def with_runbook_base(text: str, base: str | None) -> str:
    """The rule file as the chart renders it with metrics.prometheusRule.runbookBaseUrl."""
    if not base:
        return text
    return text.replace(f'runbook_url: "{RUNBOOK_PATH}#', f'runbook_url: "{base.rstrip("/")}/{RUNBOOK_PATH}#')


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def check_runbooks(alerts: list[dict]) -> None:
    """Every alert's runbook_url is deploy/runbooks.md#<a heading of that file>, one per alert."""
    anchors = {github_anchor(h) for h in re.findall(r"(?m)^#{2,3} (.+)$", RUNBOOKS.read_text())}
    problems = []
    for alert in alerts:
        url = (alert.get("annotations") or {}).get("runbook_url", "")
        path, _, anchor = url.partition("#")
        if path != RUNBOOK_PATH or anchor not in anchors:
            problems.append(f"{alert['alert']}: runbook_url {url!r}")
        elif anchor != alert["alert"].lower():
            problems.append(f"{alert['alert']}: runbook_url {url!r} is another alert's section")
    report("every alert has a runbook section", "; ".join(problems) or None, f"{len(alerts)} alerts, {RUNBOOKS.relative_to(ROOT)}")


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
    # The cluster variable: on every selector of every query (a Prometheus that holds several clusters
    # adds a `cluster` label; without one, the variable's All (.*) matches series without it).
    variables = {v["name"]: v for v in (dashboard.get("templating") or {}).get("list", [])}
    unfiltered = [
        q for q in queries
        for selector in re.findall(r"\bpod_identity_\w+(\{[^}]*\})?", q)
        if 'cluster=~"$cluster"' not in selector
    ]
    problems = []
    if "cluster" not in variables or variables["cluster"].get("allValue") != ".*":
        problems.append("no `cluster` variable with All = .*")
    if unfiltered:
        problems.append(f"queries without cluster=~\"$cluster\": {unfiltered}")
    report("dashboard cluster variable", "; ".join(problems) or None, f"{len(queries)} queries")
    unknown = unknown_metrics(queries, known)
    report("dashboard metric names", f"not exported by the agent: {sorted(unknown)}" if unknown else None)


def check_shipping() -> None:
    """deploy/shipping/vector.yaml: parses, every component's inputs name a defined source or
    transform, every source feeds something, and its file source reads the chart's default audit log.
    Vector's binary is not in the registries the project builds from, so this is a shape check, not
    `vector validate`."""
    config = yaml.safe_load(SHIPPING_VECTOR.read_text())
    sources, transforms, sinks = (config.get(k) or {} for k in ("sources", "transforms", "sinks"))
    problems = []
    fed = set()
    for kind, components in (("transform", transforms), ("sink", sinks)):
        for name, c in components.items():
            for i in c.get("inputs") or []:
                fed.add(i)
                if i not in sources and i not in transforms:
                    problems.append(f"{kind} {name}: input {i} is not defined")
            if not c.get("inputs"):
                problems.append(f"{kind} {name}: no inputs")
    problems += [f"{n} feeds nothing" for n in list(sources) + list(transforms) if n not in fed]
    if not sinks:
        problems.append("no sink")
    audit_log = yaml.safe_load((CHART / "values.yaml").read_text())["attribution"]["auditLog"]["path"]
    includes = [p for s in sources.values() if s.get("type") == "file" for p in s.get("include") or []]
    if not any(p.rstrip("*") == audit_log for p in includes):
        problems.append(f"no file source reads {audit_log}* (reads {includes})")
    report("shipping: deploy/shipping/vector.yaml", "; ".join(problems) or None,
           f"{len(sources)} sources, {len(transforms)} transforms, {len(sinks)} sinks")


def main() -> int:
    bless = "--bless" in sys.argv[1:]
    unknown_args = [a for a in sys.argv[1:] if a != "--bless"]
    if unknown_args:
        print(f"usage: {sys.argv[0]} [--bless] (unknown: {' '.join(unknown_args)})", file=sys.stderr)
        return 2
    global APP_VERSION
    APP_VERSION = str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])
    cases = case_values()
    check_versions()
    check_lint(cases)
    rendered = check_golden(cases, bless)
    check_image(cases)
    check_empty_values(cases)
    check_metrics_port(cases)
    check_flag_values(cases)
    check_token_validation(cases)
    check_pod_view(cases)
    check_schemas(rendered)
    check_original_compat()
    known = known_metrics()
    check_alerts(rendered, known)
    check_dashboard(known)
    check_shipping()
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
