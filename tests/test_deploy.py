"""The deployment files: cluster.yaml (Ray cluster launcher, AWS) and deploy/ (KubeRay). Fast: no Ray, no network."""

import contextlib
import copy
import dataclasses
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
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from msit.cli import build_parser
from msit.config import from_dict
from msit.serving.deployment import DEPLOYMENT, INGRESS, ServeArgs
from msit.training.ray_train import TrainRunConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "deploy" / "rayjob-train.yaml"
RAYSERVICE = ROOT / "deploy" / "rayservice.yaml"
REDIS = ROOT / "deploy" / "redis.yaml"
SERVE_CONFIG = ROOT / "serve" / "config.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
GPU = "nvidia.com/gpu"
HOT_RELOAD_KEYS = {"model", "data", "max_batch_size", "batch_wait_timeout_s"}  # the scorer and ingress reconfigure()s
TOKEN_ENV, TOKEN_SECRET = "MSIT_SERVE_TOKEN", {"name": "msit-serve-token", "key": "token", "optional": True}
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


def _rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


def _serve_config() -> dict:
    """The RayService's serveConfigV2: a YAML document inside a YAML string."""
    return yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])


def _serve_app() -> dict:
    apps = _serve_config()["applications"]
    assert len(apps) == 1, "deploy/rayservice.yaml should deploy msit's one application"
    return apps[0]


def _pod_specs(cluster: dict) -> list[dict]:
    """The pod specs of a KubeRay RayClusterSpec: the head's, then each worker group's."""
    return [group["template"]["spec"] for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]]


def _shared_mounts(cluster: dict) -> set[str]:
    """The mount paths of PersistentVolumeClaim volumes that every pod of the cluster mounts."""
    shared = None
    for pod in _pod_specs(cluster):
        claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] in claims}
        shared = mounts if shared is None else shared & mounts
    return shared or set()


def _on_shared_volume(path: str, shared: set[str]) -> bool:
    return any(path.startswith(m.rstrip("/") + "/") for m in shared)


def _gpus(group: dict) -> int:
    """GPUs one pod of a worker group asks for."""
    containers = group["template"]["spec"]["containers"]
    return sum(int(c.get("resources", {}).get("limits", {}).get(GPU, 0)) for c in containers)


def _gpu_groups(cluster: dict) -> list[dict]:
    return [g for g in cluster.get("workerGroupSpecs", []) if _gpus(g) > 0]


def _walk(node, path: str = ""):
    """(path, key, value) for every mapping entry in a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


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
    gpu_types = {
        name: t
        for name, t in types.items()
        if name != config["head_node_type"]
        and (t["resources"].get("GPU", 0) > 0 or GPU_INSTANCE.match(t["node_config"]["InstanceType"]))
    }
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
    gpu_groups = [
        g
        for g in cluster.get("workerGroupSpecs", [])
        if any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in g["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, "the RayJob has no worker group asking for nvidia.com/gpu"
    for group in gpu_groups:
        assert group["maxReplicas"] > group["minReplicas"], f"worker group {group['groupName']} does not autoscale"
    assert "train/main.py" in spec["entrypoint"]
    assert (ROOT / "train" / "main.py").is_file()


def test_rayjob_data_and_model_are_on_a_volume_every_pod_mounts():
    """msit reads --data and writes --output as local paths on the head and on every training worker."""
    shared = _shared_mounts(_rayjob()["spec"]["rayClusterSpec"])
    train = [args for args in _invocations(_rayjob()["spec"]["entrypoint"]) if args[0] == "train"]
    assert train
    for args in train:
        for flag in ("--data", "--output"):
            path = args[args.index(flag) + 1]
            assert _on_shared_volume(path, shared), f"{flag} {path} is not on {shared}"


def test_image_and_manifests_pin_the_project_versions():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    dockerfile = DOCKERFILE.read_text()
    assert re.search(rf"rayproject/ray:{re.escape(ray.__version__)}-py311", dockerfile)
    for text, where in ((dockerfile, "deploy/Dockerfile"), (CLUSTER.read_text(), "cluster.yaml")):
        assert set(re.findall(r"torch==[\w.+]+", text)) == {torch_pin}, f"{where} installs another torch"


def test_rayservice_manifest():
    service = _rayservice()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    spec = service["spec"]
    # A RayService names its cluster rayClusterConfig (a RayJob: rayClusterSpec); KubeRay would drop the other name.
    assert "rayClusterSpec" not in spec, "a RayService's cluster is spec.rayClusterConfig"
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster.get("authOptions", {}).get("mode") == "token"
    assert spec.get("upgradeStrategy", {}).get("type", "NewCluster") in {
        "NewCluster",
        "NewClusterWithIncrementalUpgrade",
        "None",
    }
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert GPU not in head.get("resources", {}).get("limits", {})
    gpu_groups = _gpu_groups(cluster)
    assert gpu_groups, "the RayService has no worker group asking for nvidia.com/gpu"
    for group in gpu_groups:
        # Serving keeps at least one GPU replica up: a group scaled to zero would leave no replica to answer.
        assert group["minReplicas"] >= 1, f"worker group {group['groupName']} can scale to zero"
        assert group["maxReplicas"] > group["minReplicas"], f"worker group {group['groupName']} does not autoscale"


def test_rayservice_serve_config_is_serve_config_yaml_on_the_cluster():
    config = _serve_config()
    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    validate(config)  # what `serve deploy` and the dashboard's Serve API check
    # Inside the pod the proxy must listen on the pod's interface, or the serve Service reaches nothing.
    assert config["http_options"]["host"] == "0.0.0.0", "the serve Service cannot reach a proxy on 127.0.0.1"
    app = _serve_app()
    local = {a["name"]: a for a in yaml.safe_load(SERVE_CONFIG.read_text())["applications"]}
    assert app["name"] in local, f"serve/config.yaml has no application {app['name']!r}"
    assert app["import_path"] == local[app["name"]]["import_path"], "not serve/config.yaml's application"
    names = {d["name"] for d in app.get("deployments", [])}
    assert names <= {DEPLOYMENT, INGRESS}, f"unknown deployment(s) {names - {DEPLOYMENT, INGRESS}}: Serve rejects them"


def test_rayservice_args_are_serve_args():
    args = _serve_app()["args"]
    fields = {f.name for f in dataclasses.fields(ServeArgs)}
    assert set(args) <= fields, f"unknown serve args {sorted(set(args) - fields)}; ServeArgs has {sorted(fields)}"
    cfg = from_dict(ServeArgs, args, where="deploy/rayservice.yaml args")  # what serve.app:build does first
    # Serve ignores a key of autoscaling_config that it does not know: a misspelt one would be silently lost.
    known = set(getattr(AutoscalingConfig, "model_fields", None) or AutoscalingConfig.__fields__)
    assert set(cfg.autoscaling) <= known, f"unknown autoscaling keys {sorted(set(cfg.autoscaling) - known)}"
    AutoscalingConfig(**cfg.autoscaling)
    user_configs = [cfg.user_config or {}, *(d.get("user_config") or {} for d in _serve_app().get("deployments", []))]
    for user_config in user_configs:
        assert set(user_config) <= HOT_RELOAD_KEYS, f"user_config keys {set(user_config) - HOT_RELOAD_KEYS} are ignored"


def test_rayservice_gpus_are_explicit_and_fit_the_worker_groups():
    """Left to the builder, num_gpus is 1 only if the cluster has GPUs when the application is built, and the
    GPU workers may not be up yet: the replicas would then run on CPUs."""
    cfg = from_dict(ServeArgs, _serve_app()["args"])
    assert cfg.num_gpus is not None and cfg.num_gpus > 0, "set num_gpus in the RayService's args"
    gpu_groups = _gpu_groups(_rayservice()["spec"]["rayClusterConfig"])
    autoscaling = AutoscalingConfig(**cfg.autoscaling)
    at_least = sum(_gpus(g) * g["minReplicas"] for g in gpu_groups)
    at_most = sum(_gpus(g) * g["maxReplicas"] for g in gpu_groups)
    assert autoscaling.min_replicas * cfg.num_gpus <= at_least, "the minimum replicas do not fit the minimum GPU pods"
    assert autoscaling.max_replicas * cfg.num_gpus <= at_most, "the maximum replicas would wait for GPUs forever"


def test_rayservice_exposes_nothing_outside_the_cluster():
    for path, key, value in _walk(_rayservice()):
        if key in ("type", "serviceType"):
            assert value not in ("LoadBalancer", "NodePort"), f"{path}.{key}: {value}"
        assert not (key == "enableIngress" and value), f"{path}: an Ingress is the user's choice, with TLS"


def test_rayservice_model_and_data_are_on_a_volume_every_pod_mounts():
    """The builder and every replica read the model and the prepared data as local paths, on whichever pod."""
    shared = _shared_mounts(_rayservice()["spec"]["rayClusterConfig"])
    app = _serve_app()
    sources = [
        ("args", app["args"]),
        *((f"{d['name']}.user_config", d.get("user_config") or {}) for d in app.get("deployments", [])),
    ]
    paths = [(f"{where}.{key}", conf[key]) for where, conf in sources for key in ("model", "data") if key in conf]
    assert {"args.model", "args.data"} <= {where for where, _ in paths}
    for where, path in paths:
        assert _on_shared_volume(path, shared), f"{where} {path} is not on {shared}"


def test_rayservice_auth_fails_closed_and_requests_time_out():
    """Without its token Secret the application must not deploy (require_token), never serve an open API."""
    cfg = from_dict(ServeArgs, _serve_app()["args"])
    assert cfg.require_token, "deploy/rayservice.yaml must set require_token: true (auth fails closed)"
    assert _serve_config()["http_options"]["request_timeout_s"] > 0, "a stuck request must get a 408, not hang"


def test_rayservice_token_comes_from_a_secret_on_every_pod():
    """The builder reads MSIT_SERVE_TOKEN where it runs, on any pod; the token itself never is in the manifest."""
    for pod in _pod_specs(_rayservice()["spec"]["rayClusterConfig"]):
        container = pod["containers"][0]
        env = {e["name"]: e for e in container.get("env", [])}
        assert TOKEN_ENV in env, f"{container['name']} has no {TOKEN_ENV}"
        assert "value" not in env[TOKEN_ENV], f"{container['name']}: the token belongs in the Secret"
        assert env[TOKEN_ENV]["valueFrom"]["secretKeyRef"] == TOKEN_SECRET


def test_rayservice_reads_the_redis_of_deploy_redis_yaml_with_its_secret():
    """The history URL names redis.yaml's Service and port; the password reaches every pod from the Secret Redis
    itself reads, and is in no manifest."""
    from urllib.parse import urlsplit

    from msit.serving.redis_store import is_redis_url

    docs = {d["kind"]: d for d in yaml.safe_load_all(REDIS.read_text())}
    service, statefulset = docs["Service"], docs["StatefulSet"]
    cfg = from_dict(ServeArgs, _serve_app()["args"])
    assert is_redis_url(cfg.history), "deploy/rayservice.yaml: history must be the Redis of deploy/redis.yaml"
    url = urlsplit(cfg.history)
    assert url.password is None, "the Redis password belongs in the Secret, not in the URL"
    assert url.hostname == service["metadata"]["name"], f"{url.hostname} is not redis.yaml's Service"
    assert url.port == service["spec"]["ports"][0]["port"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "Redis must not be exposed outside the cluster"
    assert cfg.history_events_per_user is not None and cfg.history_events_per_user >= 50

    redis_container = statefulset["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(redis_container["command"] + redis_container["args"])
    assert "--appendonly yes" in command, "posted events must survive a Redis restart (AOF)"
    assert '--requirepass "$REDIS_PASSWORD"' in command and "noeviction" in command
    redis_env = {e["name"]: e for e in redis_container["env"]}
    secret = redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    for pod in _pod_specs(_rayservice()["spec"]["rayClusterConfig"]):
        container = pod["containers"][0]
        env = {e["name"]: e for e in container.get("env", [])}
        assert "MSIT_REDIS_PASSWORD" in env, f"{container['name']} has no MSIT_REDIS_PASSWORD"
        assert "value" not in env["MSIT_REDIS_PASSWORD"], f"{container['name']}: the password belongs in the Secret"
        assert env["MSIT_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    for name, entry in redis_env.items():
        assert "value" not in entry, f"deploy/redis.yaml {name}: the password belongs in the Secret"


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
