"""deploy/: Kubernetes manifests valid against Kubernetes' own schemas (offline, kubernetes-validate),
the RayJob against KubeRay's RayJob spec, the CronJob's exit-code wrapper run for real, the cron line."""

from __future__ import annotations

import copy
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from labelmill import exitcodes

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# Kubernetes versions to validate against: the oldest we support (podFailurePolicy is GA in 1.31,
# CronJob timeZone in 1.27) and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ["1.31", "latest"]


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _k8s_validate(doc: dict, version: str) -> None:
    import kubernetes_validate

    if version == "latest":
        version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(doc, version, strict=True)


def _core_manifests() -> list[dict]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in _docs(f.name) if d["apiVersion"] != "ray.io/v1"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_manifests_match_kubernetes_schemas(version):
    docs = _core_manifests()
    assert {d["kind"] for d in docs} == {"ConfigMap", "CronJob"}
    for doc in docs:
        _k8s_validate(doc, version)


def test_the_validator_really_rejects_mistakes():
    import kubernetes_validate

    (cron,) = _docs("refresh-cronjob.yaml")
    typo = copy.deepcopy(cron)
    typo["spec"]["schedul"] = typo["spec"].pop("schedule")
    with pytest.raises(kubernetes_validate.ValidationError):
        _k8s_validate(typo, "latest")
    wrong_type = copy.deepcopy(cron)
    wrong_type["spec"]["jobTemplate"]["spec"]["backoffLimit"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        _k8s_validate(wrong_type, "latest")


# --------------------------------------------------------------------------- KubeRay RayJob
# Fields and types of KubeRay's RayJob (apiVersion ray.io/v1), as its Go API types define them
# (ray-project/kuberay, ray-operator/apis/ray/v1/rayjob_types.go and raycluster_types.go: the json
# tags, kubebuilder defaults and the validation markers). Pod templates are corev1.PodTemplateSpec,
# validated below with Kubernetes' own schema.
RAYJOB_SPEC = {
    "activeDeadlineSeconds": int, "backoffLimit": int, "rayClusterSpec": dict, "submitterPodTemplate": dict,
    "metadata": dict, "clusterSelector": dict, "submitterConfig": dict, "managedBy": str,
    "deletionStrategy": dict, "entrypoint": str, "runtimeEnvYAML": str, "jobId": str, "submissionMode": str,
    "entrypointResources": str, "entrypointNumCpus": (int, float), "entrypointNumGpus": (int, float),
    "ttlSecondsAfterFinished": int, "shutdownAfterJobFinishes": bool, "suspend": bool,
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}
SUBMITTER_CONFIG = {"backoffLimit": int}
RAYCLUSTER_SPEC = {
    "headGroupSpec": dict, "workerGroupSpecs": list, "rayVersion": str, "enableInTreeAutoscaling": bool,
    "autoscalerOptions": dict, "headServiceAnnotations": dict, "suspend": bool,
}
HEAD_GROUP = {"serviceType": str, "headService": dict, "enableIngress": bool, "rayStartParams": dict,
              "template": dict}
HEAD_REQUIRED = {"rayStartParams", "template"}
WORKER_GROUP = {"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int, "numOfHosts": int,
                "rayStartParams": dict, "template": dict, "scaleStrategy": dict}
WORKER_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}


def _check_fields(obj: dict, fields: dict, where: str, required: set[str] = frozenset()) -> list[str]:
    errors = [f"{where}.{k}: not a field of KubeRay's spec" for k in obj if k not in fields]
    errors += [f"{where}.{k}: expected {fields[k]}, got {type(v).__name__}"
               for k, v in obj.items() if k in fields and (not isinstance(v, fields[k])
                                                           or (fields[k] is int and isinstance(v, bool)))]
    errors += [f"{where}.{k}: required" for k in sorted(required - set(obj))]
    return errors


def _pod_template_errors(template: dict, where: str) -> list[str]:
    import kubernetes_validate

    doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    try:
        _k8s_validate(doc, "latest")
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {exc}"]
    return []


def rayjob_errors(job: dict) -> list[str]:
    errors = []
    if job.get("apiVersion") != "ray.io/v1" or job.get("kind") != "RayJob":
        errors.append("apiVersion/kind must be ray.io/v1 RayJob")
    meta = job.get("metadata", {})
    if not (meta.get("name") or meta.get("generateName")):
        errors.append("metadata: name or generateName required")
    spec = job.get("spec", {})
    errors += _check_fields(spec, RAYJOB_SPEC, "spec")
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        errors.append(f"spec.submissionMode: one of {sorted(SUBMISSION_MODES)}")
    if "ttlSecondsAfterFinished" in spec and not spec.get("shutdownAfterJobFinishes"):
        errors.append("spec.ttlSecondsAfterFinished only acts with shutdownAfterJobFinishes: true")
    if spec.get("activeDeadlineSeconds", 1) <= 0:
        errors.append("spec.activeDeadlineSeconds must be positive")
    errors += _check_fields(spec.get("submitterConfig", {}), SUBMITTER_CONFIG, "spec.submitterConfig")
    if "submitterPodTemplate" in spec:
        errors += _pod_template_errors(spec["submitterPodTemplate"], "spec.submitterPodTemplate")
    if ("rayClusterSpec" in spec) == bool(spec.get("clusterSelector")):
        errors.append("spec: exactly one of rayClusterSpec and clusterSelector")
    cluster = spec.get("rayClusterSpec")
    if cluster is not None:
        errors += _check_fields(cluster, RAYCLUSTER_SPEC, "spec.rayClusterSpec", {"headGroupSpec"})
        groups = [("spec.rayClusterSpec.headGroupSpec", cluster.get("headGroupSpec", {}), HEAD_GROUP, HEAD_REQUIRED)]
        groups += [(f"spec.rayClusterSpec.workerGroupSpecs[{i}]", g, WORKER_GROUP, WORKER_REQUIRED)
                   for i, g in enumerate(cluster.get("workerGroupSpecs", []))]
        for where, group, fields, required in groups:
            errors += _check_fields(group, fields, where, required)
            params = group.get("rayStartParams", {})
            errors += [f"{where}.rayStartParams.{k}: values are strings (map[string]string)"
                       for k, v in params.items() if not isinstance(v, str)]
            if "template" in group:
                errors += _pod_template_errors(group["template"], f"{where}.template")
            if group.get("minReplicas", 0) > group.get("maxReplicas", 2**31 - 1):
                errors.append(f"{where}: minReplicas > maxReplicas")
        names = [g.get("groupName") for g in cluster.get("workerGroupSpecs", [])]
        if len(names) != len(set(names)):
            errors.append("workerGroupSpecs: groupName must be unique")
    return errors


def test_rayjob_matches_kuberays_spec():
    (job,) = _docs("refresh-rayjob.yaml")
    assert rayjob_errors(job) == []
    spec = job["spec"]
    inner = shlex.split(spec["entrypoint"])
    assert inner[:2] == ["bash", "-c"] and inner[2].startswith("labelmill refresh ") and "--json" in inner[2]
    assert spec["shutdownAfterJobFinishes"] is True
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpu = [g for g in workers if any("nvidia.com/gpu" in c["resources"]["limits"]
                                     for c in g["template"]["spec"]["containers"])]
    assert gpu and all(g["minReplicas"] < g["maxReplicas"] for g in gpu), "GPU workers must autoscale"
    # the config the entrypoint names is the ConfigMap's key, mounted where the entrypoint looks
    (config_map,) = _docs("refresh-config.yaml")
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (volume,) = head["volumes"]
    (mount,) = head["containers"][0]["volumeMounts"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"] and mount["name"] == volume["name"]
    config_path = inner[2].split()[2]
    assert os.path.dirname(config_path) == mount["mountPath"]
    assert os.path.basename(config_path) in config_map["data"]


def test_rayjob_checker_rejects_mistakes():
    (job,) = _docs("refresh-rayjob.yaml")
    for mutate, expect in [
        (lambda j: j["spec"].__setitem__("entryPoint", "x"), "spec.entryPoint: not a field"),
        (lambda j: j["spec"].__setitem__("submissionMode", "JobMode"), "submissionMode"),
        (lambda j: j["spec"].__setitem__("shutdownAfterJobFinishes", "yes"), "expected <class 'bool'>"),
        (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), "groupName: required"),
        (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 8),
         "values are strings"),
        (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
         ["ports"][0].__setitem__("containerPort", "gcs"), "headGroupSpec.template"),
        (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
         .__setitem__("tolerance", []), "workerGroupSpecs[0].template"),
        (lambda j: j["spec"].__setitem__("clusterSelector", {"ray.io/cluster": "x"}), "exactly one of"),
    ]:
        broken = copy.deepcopy(job)
        mutate(broken)
        errors = rayjob_errors(broken)
        assert any(expect in e for e in errors), (expect, errors)


def _stand_in_labelmill(bin_dir, code: int) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    fake = bin_dir / "labelmill"
    fake.write_text(f"#!/bin/bash\necho '{{\"command\": \"refresh\", \"exit_code\": {code}}}'\n"
                    f"echo 'progress ...' >&2\nexit {code}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("code,expected", [(exitcodes.EXIT_PUBLISHED, 0), (exitcodes.EXIT_NOTHING_TO_DO, 0),
                                           (exitcodes.EXIT_FAILED_SHARDS, exitcodes.EXIT_FAILED_SHARDS),
                                           (exitcodes.EXIT_LOCK_HELD, exitcodes.EXIT_LOCK_HELD)])
def test_rayjob_entrypoint_treats_nothing_to_do_as_success(tmp_path, code, expected):
    """The RayJob succeeds or fails by its entrypoint's exit status: 7 must read as success."""
    (job,) = _docs("refresh-rayjob.yaml")
    _stand_in_labelmill(tmp_path / "bin", code)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    done = subprocess.run(job["spec"]["entrypoint"], shell=True, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == expected


# --------------------------------------------------------------------------- CronJob wrapper
def _cronjob_script() -> str:
    (cron,) = _docs("refresh-cronjob.yaml")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/bash", "-c"]
    return container["args"][0]


def test_cronjob_submits_with_ray_job_submit_and_fails_fast_on_permanent_codes():
    (cron,) = _docs("refresh-cronjob.yaml")
    script = _cronjob_script()
    assert "ray job submit" in script and "-- labelmill refresh refresh.yaml --json" in script
    job = cron["spec"]["jobTemplate"]["spec"]
    (fail_job,) = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert set(fail_job["onExitCodes"]["values"]) == set(exitcodes.PERMANENT) | {exitcodes.EXIT_LOCK_HELD}
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = job["template"]["spec"]["containers"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert f"--working-dir {mount}" in script


@pytest.mark.parametrize(
    "log_code,ray_rc,expected",
    [
        (exitcodes.EXIT_PUBLISHED, 0, 0),
        (exitcodes.EXIT_NOTHING_TO_DO, 1, 0),
        (exitcodes.EXIT_LOCK_HELD, 1, exitcodes.EXIT_LOCK_HELD),
        (exitcodes.EXIT_FAILED_SHARDS, 1, exitcodes.EXIT_FAILED_SHARDS),
        (None, 1, 1),  # no summary line (crashed before it): ray job submit's own status
    ],
)
def test_cronjob_wrapper_exits_with_labelmills_code(tmp_path, log_code, ray_rc, expected):
    """Run the CronJob's script with a stand-in `ray` that prints a job log and exits like ray job submit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    summary = f'{{"command": "refresh", "exit_code": {log_code}}}' if log_code is not None else "Traceback ..."
    fake = bin_dir / "ray"
    fake.write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/argv\necho 'Job submitted'\n"
                    f"echo '{{not json'\necho '{summary}'\necho '------'\nexit {ray_rc}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    shim = bin_dir / "python3"  # the image's python3, with labelmill importable
    shim.write_text(f'#!/bin/bash\nexec "{sys.executable}" "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    done = subprocess.run(["/bin/bash", "-c", _cronjob_script()], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == expected, done.stderr
    argv = (tmp_path / "argv").read_text()
    assert argv.startswith("job submit --submission-id labelmill-refresh-") and "refresh.yaml --json" in argv


def test_exit_code_from_log():
    lines = ["x", '{"exit_code": 6}', "{bad", '{"other": 1}', '{"exit_code": 0, "published": 4}', "tail"]
    assert exitcodes.exit_code_from_log(lines) == 0
    assert exitcodes.exit_code_from_log(["nothing"]) is None
    assert len(set(exitcodes.MEANING)) == len(exitcodes.MEANING) == 11


# --------------------------------------------------------------------------- cron
def test_cron_line():
    lines = [ln for ln in (ROOT / "deploy" / "cron" / "labelmill-refresh").read_text().splitlines()
             if ln.strip() and not ln.startswith("#") and "=" not in ln.split()[0]]
    (line,) = lines
    fields = line.split(None, 6)
    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    for value, (lo, hi) in zip(fields[:5], ranges):
        if value != "*":
            assert all(lo <= int(part) <= hi for part in value.replace("-", ",").split(",")), line
    user, command = fields[5], fields[6]
    assert user == "labelmill"
    assert "labelmill refresh " in command and "--json" in command
    assert f"-eq {exitcodes.EXIT_NOTHING_TO_DO} ] && rc=0" in command


@pytest.mark.parametrize("code,mails", [(exitcodes.EXIT_PUBLISHED, False), (exitcodes.EXIT_NOTHING_TO_DO, False),
                                        (exitcodes.EXIT_FAILED_SHARDS, True), (exitcodes.EXIT_LOCK_HELD, True)])
def test_cron_line_mails_only_failures_and_logs_the_summary(tmp_path, code, mails):
    """cron mails a job's output: the line prints nothing on 0 and 7; the JSON summary lands in a log."""
    line = [ln for ln in (ROOT / "deploy" / "cron" / "labelmill-refresh").read_text().splitlines()
            if ln.strip() and not ln.startswith("#") and "=" not in ln.split()[0]][0]
    command = line.split(None, 6)[6]
    home, logs = tmp_path / "srv", tmp_path / "log"
    logs.mkdir()
    _stand_in_labelmill(home / ".venv" / "bin", code)
    command = command.replace("/srv/labelmill", str(home)).replace("/var/log/labelmill", str(logs))
    done = subprocess.run(["/bin/bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert done.returncode == (0 if code == exitcodes.EXIT_NOTHING_TO_DO else code)
    assert bool(done.stdout.strip()) == mails and done.stderr == ""
    if mails:
        assert f"exit code {code}" in done.stdout
    (summary,) = (logs / "refresh.jsonl").read_text().splitlines()
    assert json.loads(summary)["exit_code"] == code and "progress" in (logs / "refresh.log").read_text()


def test_readme_lists_every_exit_code():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Nightly refresh"):]
    for code in exitcodes.MEANING:
        assert f"| {code} |" in section, code
