"""Offline checks of everything under deploy/ and of the Dockerfile (no cluster, no network).

- Core kinds: ``kubernetes_validate`` in strict mode (unknown fields rejected)
  against the schemas bundled in the package for ``K8S_VERSION``.
- Fluid kinds: the CRD schemas in ``../shared/fluid/crds`` (beside the clone),
  made strict (``additionalProperties: false``), see shared/fluid/NOTES.md §5.
- yamllint with ``.yamllint.yaml``.
- What no schema catches: privilege, propagation and paths, names that must
  agree across files, secret file modes, sizes against volumes and limits, the
  fstype cachefs really mounts with, and that every ``cachefs`` command line in
  a manifest or the Dockerfile parses with cachefs's own CLI parser.
"""

from __future__ import annotations

import copy
import json
import os
import posixpath
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from cachefs import cli  # noqa: E402
from cachefs.config import parse_size  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


def _crds_dir() -> Path:
    """../shared/fluid/crds beside the clone; for a git worktree, beside its main checkout."""
    if os.environ.get("CACHEFS_FLUID_CRDS"):
        return Path(os.environ["CACHEFS_FLUID_CRDS"])
    candidates = [REPO.parent / "shared" / "fluid" / "crds"]
    git = REPO / ".git"
    if git.is_file():  # "gitdir: MAIN/.git/worktrees/NAME"
        gitdir = Path(git.read_text().split(":", 1)[1].strip())
        if gitdir.parent.name == "worktrees":
            candidates.append(gitdir.parent.parent.parent.parent / "shared" / "fluid" / "crds")
    return next((c for c in candidates if c.is_dir()), candidates[0])


CRDS = _crds_dir()
# The Kubernetes minor version the manifests are validated against (schemas
# bundled in kubernetes-validate 1.37.0). Also in docs/kubernetes.md.
K8S_VERSION = "1.30.0"
# Kinds that are neither core nor Fluid: no schema here. Checked by hand below.
NO_SCHEMA = {
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}
FLUID_GROUP = "data.fluid.io/"

MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml"))


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _docs() -> list[tuple[Path, dict]]:
    """The Kubernetes objects (not the kustomizations) of deploy/."""
    return [(p, d) for p in MANIFESTS for d in _load(p) if d["kind"] != "Kustomization"]


def _kind(kind: str) -> list[dict]:
    return [d for _, d in _docs() if d["kind"] == kind]


def _one(kind: str, name: str) -> dict:
    found = [d for d in _kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pod_specs():
    """(label, pod spec) of every workload, DataProcess script pods included."""
    for path, d in _docs():
        label = f"{path.relative_to(REPO)}: {d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Pod":
            yield label, d["spec"]
        elif d["kind"] in ("DaemonSet", "StatefulSet", "Deployment", "Job"):
            yield label, d["spec"]["template"]["spec"]


def _containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


# -- inventory -------------------------------------------------------------------


def test_deploy_has_manifests():
    names = {p.relative_to(DEPLOY).as_posix() for p in MANIFESTS}
    for expected in ("k8s/worker-statefulset.yaml", "k8s/mount-daemonset.yaml", "k8s/worker-service.yaml",
                     "k8s/worker-pdb.yaml", "fluid/thinruntimeprofile.yaml", "fluid/dataset.yaml",
                     "fluid/preheat.yaml", "monitoring/servicemonitor.yaml"):
        assert expected in names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_document_has_a_known_kind(path):
    for d in _load(path):
        key = (d["apiVersion"], d["kind"])
        assert d["apiVersion"].startswith(FLUID_GROUP) or key in NO_SCHEMA or "/" not in d["apiVersion"] \
            or d["apiVersion"].split("/")[0].endswith(".k8s.io") or d["apiVersion"].split("/")[0] in ("apps", "policy", "batch"), key


def test_kustomizations_list_existing_files():
    for k in DEPLOY.rglob("kustomization.yaml"):
        d = yaml.safe_load(k.read_text())
        for r in d.get("resources", []):
            assert (k.parent / r).exists(), f"{k}: {r} does not exist"
        for gen in d.get("configMapGenerator", []):
            for f in gen.get("files", []):
                assert (k.parent / f.split("=")[-1]).is_file(), f"{k}: {f} does not exist"
    # every manifest of deploy/k8s (examples aside) is applied by its kustomization
    listed = set(yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert present == listed


def test_grafana_dashboard_is_referenced_and_json():
    json.loads((DEPLOY / "grafana" / "cachefs.json").read_text())
    root = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = [f for g in root["configMapGenerator"] for f in g["files"]]
    assert "grafana/cachefs.json" in files


# -- schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_core_kinds_validate_strict(path):
    for d in _load(path):
        if d["apiVersion"].startswith(FLUID_GROUP) or (d["apiVersion"], d["kind"]) in NO_SCHEMA:
            continue
        # raises ValidationError (or SchemaNotFoundError for a kind it lacks)
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_kubernetes_validate_is_offline_and_strict():
    # The schemas come from the package; strict mode rejects a misspelt field.
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"clusterIp": "None", "ports": [{"port": 1}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _crd_schemas() -> dict:
    if not CRDS.is_dir():
        pytest.skip(f"Fluid CRDs not found at {CRDS} (CI checks out shared/ beside the repo)")
    out = {}
    for p in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(p.read_text())
        for v in crd["spec"]["versions"]:
            key = (f'{crd["spec"]["group"]}/{v["name"]}', crd["spec"]["names"]["kind"])
            out[key] = v["schema"]["openAPIV3Schema"]
    return out


def _strictify(s):
    if isinstance(s, list):
        return [_strictify(x) for x in s]
    if not isinstance(s, dict):
        return s
    s = {k: _strictify(v) for k, v in s.items()}
    if s.get("type") == "object" and "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        s.setdefault("additionalProperties", False)
    if s.pop("x-kubernetes-int-or-string", False):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return s


def _validate_fluid(doc: dict, schemas: dict) -> None:
    key = (doc["apiVersion"], doc["kind"])
    assert key in schemas, f"no CRD for {key}"
    schema = _strictify(copy.deepcopy(schemas[key]))
    schema["properties"].pop("metadata", None)
    jsonschema.Draft4Validator(schema).validate({k: v for k, v in doc.items() if k != "metadata"})


def test_fluid_kinds_validate_against_crds():
    schemas = _crd_schemas()
    fluid = [d for _, d in _docs() if d["apiVersion"].startswith(FLUID_GROUP)]
    assert {d["kind"] for d in fluid} >= {"ThinRuntimeProfile", "Dataset", "ThinRuntime", "DataProcess"}
    for d in fluid:
        _validate_fluid(d, schemas)


def test_fluid_validation_rejects_unknown_fields():
    schemas = _crd_schemas()
    bad = copy.deepcopy(_one("ThinRuntimeProfile", "cachefs"))
    bad["spec"]["fuse"]["optoins"] = bad["spec"]["fuse"].pop("options")
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        _validate_fluid(bad, schemas)


def test_yamllint():
    from yamllint import config, linter

    conf = config.YamlLintConfig(file=str(REPO / ".yamllint.yaml"))
    problems = [f"{p.relative_to(REPO)}:{e.line}: {e.message}"
                for p in MANIFESTS for e in linter.run(p.read_text(), conf, str(p))]
    assert not problems, "\n".join(problems)


# -- semantics -------------------------------------------------------------------


def test_bidirectional_only_with_privileged():
    seen = 0
    for label, spec in _pod_specs():
        for c in _containers(spec):
            for vm in c.get("volumeMounts", []):
                if vm.get("mountPropagation") == "Bidirectional":
                    seen += 1
                    assert c.get("securityContext", {}).get("privileged") is True, f"{label}: {c['name']}"
    assert seen


def _cachefs_argv(container: dict) -> list[str]:
    """The cachefs argv (without "cachefs") a container runs, directly, as args to the image
    entrypoint, or as `exec cachefs ...` in a `bash -c` script."""
    cmd = container.get("command", []) + container.get("args", [])
    if not container.get("command"):
        return cmd  # the image ENTRYPOINT is cachefs
    if cmd[0] == "cachefs":
        return cmd[1:]
    if cmd[0] in ("bash", "sh") and cmd[1] == "-c":
        m = re.search(r"\bexec cachefs (.*)$", cmd[2], re.S)
        assert m, f"no `exec cachefs` in {cmd[2]!r}"
        return shlex.split(m.group(1))
    raise AssertionError(f"not a cachefs command: {cmd}")


def _parse(argv: list[str]):
    argv = [re.sub(r"\$\((\w+)\)", "10.0.0.1", a) for a in argv]  # kubelet expands $(POD_IP)
    return cli._parser().parse_args(argv)


def _mountpoint(a) -> str:
    """`cachefs mount MOUNTPOINT --dataset ...`: argparse fills the first positional."""
    return a.mountpoint or a.source


def test_daemonset_mount():
    ds = _one("DaemonSet", "cachefs-mount")
    assert ds["spec"]["updateStrategy"]["type"] == "OnDelete"
    spec = ds["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    (c,) = spec["containers"]
    assert c["securityContext"]["privileged"] is True
    a = _parse(_cachefs_argv(c))
    assert a.command == "mount"
    mountpoint = _mountpoint(a)
    vols = {v["name"]: v for v in spec["volumes"]}
    bidir = [vm for vm in c["volumeMounts"] if vm.get("mountPropagation") == "Bidirectional"]
    assert len(bidir) == 1
    host = vols[bidir[0]["name"]]["hostPath"]["path"]
    # the same path inside and outside, and a strict parent of the mount point
    assert bidir[0]["mountPath"] == host
    assert posixpath.commonpath([host, mountpoint]) == host and host != mountpoint.rstrip("/")
    # the preStop unmounts that mount point, the readiness probe checks it
    assert c["lifecycle"]["preStop"]["exec"]["command"][-1] == mountpoint
    assert mountpoint in " ".join(c["readinessProbe"]["exec"]["command"])
    assert "fuse.cachefs" in " ".join(c["readinessProbe"]["exec"]["command"])


def test_apps_use_host_to_container_on_a_parent_dir():
    ds = _one("DaemonSet", "cachefs-mount")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    mountpoint = _mountpoint(_parse(_cachefs_argv(c)))
    pod = _one("Pod", "cachefs-reader")
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    for vm in pod["spec"]["containers"][0]["volumeMounts"]:
        host = vols[vm["name"]]["hostPath"]["path"]
        assert vm["mountPropagation"] == "HostToContainer"
        assert posixpath.commonpath([host, mountpoint]) == host and host != mountpoint


def _mem(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", q)
    assert m, q
    return int(m.group(1)) * units[m.group(2)]


def _budget(a) -> int:
    """docs/configuration.md: the daemon's memory, before page cache (100,000 meta entries):
    --mem-size holds every chunk in memory, warm-up loads too; Python and metadata come on top."""
    return parse_size(a.mem_size, "mem") + (150 << 20) + 350 * 100_000


def test_worker_statefulset():
    sts = _one("StatefulSet", "cachefs-worker")
    svc = _one("Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    pdb = _one("PodDisruptionBudget", "cachefs-worker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    spec = sts["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 60
    (c,) = spec["containers"]
    a = _parse(_cachefs_argv(c))
    assert a.command == "worker"
    # the cache below its volume
    (claim,) = [t for t in sts["spec"]["volumeClaimTemplates"]
                if any(vm["name"] == t["metadata"]["name"] and vm["mountPath"] == a.cache_dir
                       for vm in c["volumeMounts"])]
    assert parse_size(a.cache_size, "cache") < _mem(claim["spec"]["resources"]["requests"]["storage"])
    # memory: the budget plus at least 1 GiB of page cache
    assert _mem(c["resources"]["limits"]["memory"]) >= _budget(a) + (1 << 30)
    # probes on the metrics port
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(a.metrics.rsplit(":", 1)[1]) == port["metrics"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert int(a.listen.rsplit(":", 1)[1]) == port["peer"]


def test_mount_memory_and_peers_match_workers():
    sts = _one("StatefulSet", "cachefs-worker")
    svc = _one("Service", sts["spec"]["serviceName"])
    worker = _parse(_cachefs_argv(sts["spec"]["template"]["spec"]["containers"][0]))
    ds = _one("DaemonSet", "cachefs-mount")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    mount = _parse(_cachefs_argv(c))
    assert _mem(c["resources"]["limits"]["memory"]) >= _budget(mount) + (1 << 30)
    peer_port = worker.listen.rsplit(":", 1)[1]
    dns = f"dns+{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{peer_port}"
    assert mount.peers == dns
    assert _one("ThinRuntime", "imagenet")["spec"]["fuse"]["options"]["peers"] == dns
    # the ring's chunk keys include the source URL: spelt the same on both sides
    worker_urls = {s.split("=", 1)[1].rstrip("/") for s in worker.source}
    mount_urls = {d.split("=", 1)[1].split(",")[0].rstrip("/") for d in mount.dataset}
    assert mount_urls <= worker_urls
    fluid_urls = {m["mountPoint"].rstrip("/") for m in _one("Dataset", "imagenet")["spec"]["mounts"]}
    assert fluid_urls <= worker_urls


def test_secret_files_are_owner_only():
    """cachefs refuses secret files that group or others can read."""
    vols = []
    for label, spec in _pod_specs():
        assert "fsGroup" not in spec.get("securityContext", {}), label
        vols += [(label, v) for v in spec.get("volumes", [])]
    for d in _kind("ThinRuntimeProfile") + _kind("ThinRuntime"):
        vols += [(d["metadata"]["name"], v) for v in d["spec"].get("volumes", [])]
    secrets = [(label, v["secret"]) for label, v in vols if "secret" in v]
    assert secrets
    for label, s in secrets:
        assert s.get("defaultMode") == 0o400, f"{label}: {s}"
        assert all(i.get("mode", 0o400) == 0o400 for i in s.get("items", [])), label


def test_probes_do_not_use_var_expansion():
    """Kubernetes expands $(VAR) in command/args/env, never in probes."""
    probes = []
    for label, spec in _pod_specs():
        for c in _containers(spec):
            probes += [(label, c.get(k)) for k in ("livenessProbe", "readinessProbe", "startupProbe")]
    for d in _kind("ThinRuntimeProfile") + _kind("ThinRuntime"):
        fuse = d["spec"].get("fuse", {})
        probes += [(d["metadata"]["name"], fuse.get(k)) for k in ("livenessProbe", "readinessProbe")]
    for label, p in probes:
        assert "$(" not in json.dumps(p or {}), label


def test_thinruntime_names_its_dataset_and_profile():
    datasets = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in _kind("Dataset")}
    profiles = {d["metadata"]["name"] for d in _kind("ThinRuntimeProfile")}
    runtimes = _kind("ThinRuntime")
    assert runtimes
    for r in runtimes:
        assert (r["metadata"]["namespace"], r["metadata"]["name"]) in datasets
        assert r["spec"]["profileName"] in profiles
    for d in _kind("DataProcess"):
        assert (d["spec"]["dataset"]["namespace"], d["spec"]["dataset"]["name"]) in datasets


def test_fluid_profile_and_preheat_commands():
    prof = _one("ThinRuntimeProfile", "cachefs")
    # `cachefs fluid-mount` is another branch's work: accept it before it lands.
    assert prof["spec"]["fuse"]["command"] == ["cachefs", "fluid-mount"]
    probe = " ".join(prof["spec"]["fuse"]["readinessProbe"]["exec"]["command"])
    assert "/proc/self/mountinfo" in probe and "stat " in probe
    secret_mounts = [vm for vm in prof["spec"]["fuse"]["volumeMounts"] if vm["name"] == "cachefs-peer"]
    assert secret_mounts and prof["spec"]["fuse"]["options"]["secret-file"].startswith(secret_mounts[0]["mountPath"])
    dp = _one("DataProcess", "imagenet-preheat")
    script = dp["spec"]["processor"]["script"]
    line = re.search(r"exec cachefs (.*)", script["source"]).group(1)
    a = _parse(shlex.split(line))
    assert a.command == "warmup" and a.recursive and 0 < a.wait_ratio <= 1
    mount_path = dp["spec"]["dataset"]["mountPath"]
    assert all(posixpath.commonpath([mount_path, p]) == mount_path for p in a.paths)
    # the control socket (CACHE_DIR/run of the FUSE pod) is visible at the same path
    cache_dir = _one("ThinRuntime", "imagenet")["spec"]["fuse"]["options"]["cache-dir"]
    vols = {v["name"]: v for v in script["volumes"]}
    run = [vm for vm in script["volumeMounts"] if vm["mountPath"] == posixpath.join(cache_dir, "run")]
    assert run and vols[run[0]["name"]]["hostPath"]["path"] == run[0]["mountPath"]
    levels = _one("ThinRuntime", "imagenet")["spec"]["tieredstore"]["levels"]
    assert posixpath.commonpath([levels[0]["path"], cache_dir]) == levels[0]["path"]


def _fstype(mountpoint: str) -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, post = line.split(" - ", 1)
        if pre.split()[4] == mountpoint:
            return post.split()[0]
    raise AssertionError(f"{mountpoint} not in /proc/self/mountinfo")


@pytest.mark.integration
def test_profile_fstype_is_what_cachefs_mounts_with(local_source, cachefs_mount):
    m = cachefs_mount(local_source)
    fstype = _fstype(os.path.realpath(m.mountpoint))
    for prof in _kind("ThinRuntimeProfile"):
        assert prof["spec"]["fileSystemType"] == fstype
    # the probes grep for the same type
    ds = _one("DaemonSet", "cachefs-mount")
    assert f" {fstype} " in " ".join(ds["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"])


# -- Dockerfile ------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_copy_sources_exist_and_are_not_ignored():
    ignored = (REPO / ".dockerignore").read_text().split()
    copies = [rest for op, rest in _dockerfile() if op == "COPY"]
    assert copies
    for rest in copies:
        *srcs, _dest = shlex.split(rest)
        for src in srcs:
            assert (REPO / src).exists(), src
            assert src.rstrip("/") not in ignored, src
    # what the build needs: the packaging files, the sources and the install script
    copied = {s.rstrip("/") for rest in copies for s in shlex.split(rest)[:-1]}
    assert {"setup.py", "setup.cfg", "pyproject.toml", "native", "cachefs", "scripts/setup.sh"} <= copied


def test_dockerfile_runs_setup_sh_and_installs_fluid_tools():
    steps = _dockerfile()
    assert steps[0][0] == "FROM" and "slim" in steps[0][1]
    runs = [rest for op, rest in steps if op == "RUN"]
    assert any("scripts/setup.sh" in r for r in runs)
    # the image gets the package alone, not the test and benchmark tools
    assert any("CACHEFS_EXTRAS= bash scripts/setup.sh" in r for r in runs)
    assert "EXTRAS=${CACHEFS_EXTRAS-test}" in (REPO / "scripts/setup.sh").read_text()
    apt = " ".join(r for r in runs if "apt-get install" in r).split()
    for pkg in ("bash", "coreutils", "grep", "util-linux", "fuse3"):
        assert pkg in apt
    for r in runs:  # each RUN is a shell script that parses
        shlex.split(r)


def test_dockerfile_entrypoint_is_the_cli():
    steps = dict(_dockerfile())
    assert json.loads(steps["ENTRYPOINT"]) == ["cachefs"]
    cmd = json.loads(steps["CMD"])
    with pytest.raises(SystemExit) as e:  # `cachefs worker --help`
        _parse(cmd)
    assert e.value.code == 0
    # `cachefs` is the console script the install creates
    assert "cachefs = cachefs.cli:main" in (REPO / "setup.cfg").read_text()
    assert "/opt/cachefs/.venv/bin" in steps["ENV"]


def test_every_manifest_cachefs_command_parses():
    """Every container running the image runs a real subcommand with real flags."""
    n = 0
    for label, spec in _pod_specs():
        for c in _containers(spec):
            if "cachefs" not in c["image"]:
                continue
            a = _parse(_cachefs_argv(c))
            assert a.command in ("mount", "worker"), label
            n += 1
    assert n >= 2
