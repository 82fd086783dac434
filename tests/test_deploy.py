"""The deployment files: cluster.yaml (Ray cluster launcher, AWS) and deploy/ (KubeRay). Fast: no Ray, no network."""

import contextlib
import copy
import fnmatch
import io
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from msit.cli import build_parser
from msit.ray_train import TrainRunConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "deploy" / "rayjob-train.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
CONFIG_REF = re.compile(r"--config\s+(train/configs/[\w.-]+\.ya?ml)")
GPU_INSTANCE = re.compile(r"^(g\d|p\d)[a-z]*\.")  # AWS GPU families: g4dn, g5, g6, p4d, p5...
STORAGE = re.compile(r"MSIT_STORAGE_PATH=(s3://|gs://|/mnt/)\S+")


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _prepared_cluster() -> dict:
    """cluster.yaml as `ray up` sees it before it talks to AWS: defaults filled in, setup commands merged."""
    return prepare_config(copy.deepcopy(_cluster()))


def _rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def _submitted_commands() -> list[str]:
    """The entrypoints of the `ray job submit ... -- ENTRYPOINT` lines in cluster.yaml's comments, and the RayJob's."""
    lines = [line.lstrip("# ") for line in CLUSTER.read_text().splitlines() if line.startswith("#")]
    commands = [line.split(" -- ", 1)[1] for line in lines if "ray job submit" in line and " -- " in line]
    return [*commands, _rayjob()["spec"]["entrypoint"]]


def _invocations(command: str) -> list[list[str]]:
    """msit's arguments in a shell command line: `msit ARGS` gives ARGS, `python train/main.py ARGS` gives
    ["train", *ARGS]; `bash -c '...'` is looked into."""
    words = shlex.split(command)
    if words[:2] == ["bash", "-c"]:
        return _invocations(words[2])
    found = []
    for part in re.split(r"&&|\|\||;|[()]", command):
        words = shlex.split(part)
        if words and words[0] == "msit":
            found.append(words[1:])
        elif len(words) > 1 and words[0].startswith("python") and words[1].endswith("train/main.py"):
            found.append(["train", *words[2:]])
    return found


def _referenced_configs() -> list[str]:
    return sorted(set(CONFIG_REF.findall(CLUSTER.read_text()) + CONFIG_REF.findall(RAYJOB.read_text())))


def _setup_commands_per_node_type(config: dict) -> dict[str, list[str]]:
    """The setup commands each node type runs (a node type's own worker_setup_commands replace the merged ones)."""
    out = {}
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            out[name] = config["head_setup_commands"]
        else:
            out[name] = node_type.get("worker_setup_commands", config["worker_setup_commands"])
    return out


def _pip_installs_msit(command: str) -> bool:
    return "pip install" in command and "~/msit" in command


# --- cluster.yaml ---------------------------------------------------------------------------------------------------


def test_cluster_yaml_passes_ray_validation():
    validate_config(_prepared_cluster())  # Ray's ray-schema.json plus its own checks (head type, min/max workers)


def test_cluster_head_has_no_gpu_and_gpu_workers_autoscale():
    config = _prepared_cluster()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"])
    gpu_types = {name: t for name, t in types.items() if name != config["head_node_type"]
                 and (t["resources"].get("GPU", 0) > 0 or GPU_INSTANCE.match(t["node_config"]["InstanceType"]))}
    assert gpu_types, "cluster.yaml has no GPU worker node type"
    for name, node_type in gpu_types.items():
        # Declared, not left to autodetection: without it the autoscaler may not know the type has GPUs.
        assert node_type["resources"].get("GPU", 0) > 0, f"{name}: declare its GPUs in resources"
        assert node_type["max_workers"] > node_type["min_workers"], f"{name} does not autoscale"
        assert node_type["max_workers"] <= config["max_workers"]


def test_every_node_installs_msit_and_the_right_torch():
    config = _prepared_cluster()
    for name, commands in _setup_commands_per_node_type(config).items():
        msit = [i for i, c in enumerate(commands) if _pip_installs_msit(c)]
        assert msit, f"node type {name} never installs msit: {commands}"
        node_type = config["available_node_types"][name]
        wants_cuda = node_type["resources"].get("GPU", 0) > 0
        index = "download.pytorch.org/whl/cu" if wants_cuda else "download.pytorch.org/whl/cpu"
        torch = [i for i, c in enumerate(commands) if "torch==" in c and index in c]
        # Installed before msit, so that msit's own torch pin is already met by this build.
        assert torch and torch[0] < msit[0], f"node type {name}: install torch from {index} before msit"


def test_cluster_exports_a_shared_storage_path():
    config = _prepared_cluster()
    for name, commands in _setup_commands_per_node_type(config).items():
        assert any(STORAGE.search(c) for c in commands), f"node type {name} gets no MSIT_STORAGE_PATH"
    train = [args for c in _submitted_commands()[:-1] for args in _invocations(c) if args[0] == "train"]
    assert train, "cluster.yaml's comments show no training submission"
    for args in train:
        assert "--storage-path" in args


def test_rsync_excludes_keep_the_package():
    """An unanchored pattern such as "data" would also drop msit/data from the copy on every node."""
    files = [p.relative_to(ROOT) for p in (ROOT / "msit").rglob("*.py")] + [Path("train/main.py")]
    for pattern in _cluster().get("rsync_exclude", []):
        if pattern.startswith("/"):
            continue
        for path in files:
            assert not any(fnmatch.fnmatch(part, pattern) for part in path.parts), f"{pattern!r} excludes {path}"


# --- deploy/ (KubeRay) ----------------------------------------------------------------------------------------------


def test_rayjob_manifest():
    job = _rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert spec["shutdownAfterJobFinishes"] is True
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head.get("resources", {}).get("limits", {})
    gpu_groups = [g for g in cluster.get("workerGroupSpecs", [])
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "the RayJob has no worker group asking for nvidia.com/gpu"
    for group in gpu_groups:
        assert group["maxReplicas"] > group["minReplicas"], f"worker group {group['groupName']} does not autoscale"
    assert "train/main.py" in spec["entrypoint"]
    assert (ROOT / "train" / "main.py").is_file()


def test_rayjob_data_and_model_are_on_a_volume_every_pod_mounts():
    """msit reads --data and writes --output as local paths on the head and on every training worker."""
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    pods = [group["template"]["spec"] for group in groups]
    shared = None
    for pod in pods:
        claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] in claims}
        shared = mounts if shared is None else shared & mounts
    train = [args for args in _invocations(_rayjob()["spec"]["entrypoint"]) if args[0] == "train"]
    assert train
    for args in train:
        for flag in ("--data", "--output"):
            path = args[args.index(flag) + 1]
            assert any(path.startswith(m.rstrip("/") + "/") for m in shared), f"{flag} {path} is not on {shared}"


def test_image_and_manifests_pin_the_project_versions():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"rayproject/ray:{re.escape(ray.__version__)}-py311", dockerfile)
    for text, where in ((dockerfile, "deploy/Dockerfile"), (CLUSTER.read_text(), "cluster.yaml")):
        assert set(re.findall(r"torch==[\w.+]+", text)) == {torch_pin}, f"{where} installs another torch"


# --- both -----------------------------------------------------------------------------------------------------------


def test_manifests_reference_train_configs():
    assert _referenced_configs(), "no --config train/configs/... in cluster.yaml or deploy/rayjob-train.yaml"


@pytest.mark.parametrize("config", _referenced_configs())
def test_referenced_train_config_loads(config):
    path = ROOT / config
    assert path.is_file(), f"{config} is referenced by the deployment files but does not exist"
    TrainRunConfig.load(path)


def _help(subcommand: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*subcommand, "--help"])
    return out.getvalue()


@pytest.mark.parametrize("command", _submitted_commands(), ids=lambda c: c.split()[0] + "..." + c[-40:])
def test_submitted_commands_parse(command, capsys):
    invocations = _invocations(command)
    assert invocations, f"no msit command in {command!r}"
    for args in invocations:
        try:
            build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"msit rejects `msit {shlex.join(args)}`: {capsys.readouterr().err.strip()}")
        # Spelled out, not an abbreviation that argparse happens to accept today.
        options = set(re.findall(r"--[\w-]+", _help(args[:2] if args[0] == "data" else args[:1])))
        for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
            assert flag in options, f"`msit {shlex.join(args)}`: {flag} is not one of msit's options"
        if args[0] == "train":  # "auto" sees no GPU while the GPU workers are scaled to zero
            assert build_parser().parse_args(args).use_gpu == "true", f"`msit {shlex.join(args)}` needs --use-gpu true"
