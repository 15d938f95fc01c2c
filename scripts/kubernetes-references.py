#!/usr/bin/env python3
"""What the Kubernetes schemas cannot check in deploy/kubernetes (run by
scripts/check-kubernetes.sh, with kubernetes-validate's PyYAML)."""
import glob
import os
import re
import subprocess
import sys
import tempfile

import yaml

binary, folder = sys.argv[1:3]
docs = []
for path in sorted(glob.glob(os.path.join(folder, "*.yaml"))):
    for doc in yaml.safe_load_all(open(path)):
        if doc:
            docs.append((os.path.basename(path), doc))
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL " + msg)


def find(kind, name=None):
    return [d for _, d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


metrics = subprocess.run(["grep", "-rhoE", r"sluicegate_[a-z_]+", "src/metrics.rs"], capture_output=True, text=True).stdout.split()

# Every sluicegate config in a ConfigMap is valid.
for cm in find("ConfigMap"):
    for key, text in cm.get("data", {}).items():
        if key.endswith(".toml"):
            with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
                f.write(text)
            out = subprocess.run([binary, "check-config", f.name], capture_output=True, text=True)
            os.unlink(f.name)
            if out.returncode != 0:
                fail(f"configmap {cm['metadata']['name']} {key}: {out.stderr.strip()}")

for deploy in find("Deployment"):
    spec = deploy["spec"]["template"]["spec"]
    name = deploy["metadata"]["name"]
    grace = spec.get("terminationGracePeriodSeconds", 30)
    proxies = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "sluicegate"]
    if not proxies:
        fail(f"deployment {name}: no sluicegate container")
        continue
    proxy = proxies[0]
    if proxy in spec.get("initContainers", []) and proxy.get("restartPolicy") != "Always":
        fail(f"deployment {name}: the sidecar needs restartPolicy: Always (a native sidecar)")
    for probe, path in [("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]:
        if proxy.get(probe, {}).get("httpGet", {}).get("path") != path:
            fail(f"deployment {name}: {probe} should GET {path}")
    sleep = proxy.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    # The drain (drain_timeout_ms of its config) must end before the kill.
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in proxy.get("volumeMounts", []):
        cm_name = volumes.get(mount["name"], {}).get("configMap", {}).get("name")
        for cm in find("ConfigMap", cm_name) if cm_name else []:
            for text in cm["data"].values():
                m = re.search(r"drain_timeout_ms\s*=\s*(\d+)", text)
                drain = int(m.group(1)) / 1000 if m else 10
                if sleep + drain >= grace:
                    fail(f"deployment {name}: preStop {sleep} s + drain {drain} s >= terminationGracePeriodSeconds {grace}")
    ctx = proxy.get("securityContext", {})
    if not ctx.get("readOnlyRootFilesystem") or not spec.get("securityContext", {}).get("runAsNonRoot"):
        fail(f"deployment {name}: sluicegate must run as non-root on a read-only root filesystem")
    if "resources" not in proxy:
        fail(f"deployment {name}: sluicegate has no resources")

for so in find("ScaledObject"):
    target = so["spec"]["scaleTargetRef"]["name"]
    if not find("Deployment", target):
        fail(f"scaledobject {so['metadata']['name']}: no Deployment {target}")
    for trigger in so["spec"]["triggers"]:
        for metric in re.findall(r"sluicegate_[a-z_]+", trigger["metadata"].get("query", "")):
            if metric not in metrics:
                fail(f"scaledobject {so['metadata']['name']}: {metric} is not a sluicegate metric")

for pm in find("PodMonitor"):
    wanted = set(pm["spec"]["selector"]["matchExpressions"][0]["values"])
    ports = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    for deploy in find("Deployment"):
        labels = deploy["spec"]["template"]["metadata"]["labels"]
        if labels.get("app.kubernetes.io/name") in wanted:
            spec = deploy["spec"]["template"]["spec"]
            named = {p.get("name") for c in spec.get("initContainers", []) + spec["containers"] for p in c.get("ports", [])}
            if not ports <= named:
                fail(f"podmonitor {pm['metadata']['name']}: deployment {deploy['metadata']['name']} has no port {ports - named}")

print(f"{len(docs)} resources checked, {len(failures)} problems")
sys.exit(1 if failures else 0)
