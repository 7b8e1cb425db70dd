"""Cluster launcher configs (cluster/*.yaml): Ray's own validator plus project rules.

Ray's validator runs offline: ``prepare_config`` merges the provider's defaults.yaml
(a file shipped with Ray), the common setup commands, checks the docker section locally
and fills per-node-type worker counts; ``validate_config`` checks the result against
ray/autoscaler/ray-schema.json (unknown keys are rejected) plus the worker-count and
head-node-type rules. The cloud calls (IAM roles, subnets, security groups, AMIs) happen
only in ``bootstrap_config`` during ``ray up``, which these tests do not call; to prove
it, the validator runs here with network connections blocked.

The project rules (DESIGN.md section 6 and the cluster section of section 5) are one
function, ``cluster_problems``, run on every config and on broken copies of them.
"""

from __future__ import annotations

import copy
import re
import shlex
import socket
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = ROOT / "cluster"
CONFIGS = sorted(CLUSTER_DIR.glob("*.yaml"))
TOKEN_LOCAL_PATH = "~/.ray/auth_token"
DOCKER_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
# GPU instance types this project targets, and their GPU count.
AWS_GPU_TYPES = {"p4d.24xlarge": 8, "p4de.24xlarge": 8}
# The shared filesystem (EFS / Filestore over NFS) every node mounts, host and container alike;
# run.root and AKOD_DATA_DIR live on it. The bucket variants (AKOD_DATA_DIR=s3://... or gs://...) mount
# nothing and give every node credentials for the bucket instead (an instance profile, a service account).
SHARED_ROOT = "/mnt/akod-shared"
BUCKET_SCHEMES = {"aws": "s3", "gcp": "gs"}
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS")
CLUSTER_SWEEP_CONFIG = ROOT / "tune_configs" / "cifar10_a100.yaml"


def load(path: Path) -> dict:
    with open(path) as f:
        cfg = yaml.safe_load(f)
    assert isinstance(cfg, dict), f"{path.name}: not a mapping"
    return cfg


def ray_validate(cfg: dict) -> dict:
    """Ray's own offline validation; returns the prepared (defaults-merged) config."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection (proves the validator is offline)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# --------------------------------------------------------------------------- helpers


def docker_size(value: str) -> int:
    """Bytes in a Docker size such as ``20g``, ``512m``, ``1048576``."""
    m = re.fullmatch(r"'?(\d+(?:\.\d+)?)\s*([bkmg]?)b?'?", value.strip().lower())
    if not m:
        raise ValueError(f"not a Docker size: {value!r}")
    return int(float(m.group(1)) * DOCKER_SIZE_UNITS[m.group(2)])


def flag_values(words: list[str], flag: str) -> list[str]:
    """Values of ``--flag=value`` / ``--flag value`` in a list of shell words."""
    out = []
    for k, w in enumerate(words):
        if w.startswith(flag + "="):
            out.append(w.split("=", 1)[1])
        elif w == flag and k + 1 < len(words):
            out.append(words[k + 1])
    return out


def exported(command: str) -> dict[str, str]:
    """Variables set by ``export A=1 B=2`` statements in a shell command string."""
    env = {}
    for statement in re.split(r"[;&|\n]+", command):
        words = shlex.split(statement)
        if words and words[0] == "export":
            env.update(w.split("=", 1) for w in words[1:] if "=" in w)
    return env


def ray_start(commands: list[str], head: bool) -> str:
    found = [c for c in commands if "ray start" in c and (("--head" in c) == head)]
    assert len(found) == 1, f"expected one {'head' if head else 'worker'} `ray start` command, got {found}"
    return found[0]


def initialization_commands_for(cfg: dict, node_type: str) -> list[str]:
    """Host commands of a node type: its own initialization_commands replace the global ones."""
    nt = cfg["available_node_types"][node_type]
    return list(nt["initialization_commands"] if "initialization_commands" in nt else cfg.get("initialization_commands", []))


def docker_env(words: list[str]) -> dict[str, str]:
    """Variables set by ``-e A=1`` / ``--env A=1`` in docker run options (split into words)."""
    return dict(v.split("=", 1) for v in flag_values(words, "-e") + flag_values(words, "--env") if "=" in v)


def nfs_mounts(command: str) -> list[tuple[str, str, str]]:
    """(type, source, target) of every ``mount -t nfs|nfs4 ... SOURCE TARGET`` in a shell command."""
    out = []
    for statement in re.split(r"[;&|{}()\n]+", command):
        words = shlex.split(statement)
        if "mount" not in words:
            continue
        words = words[words.index("mount") + 1:]
        fstype = flag_values(words, "-t")
        positional, skip = [], False
        for w in words:
            if skip:
                skip = False
            elif w in ("-t", "-o"):
                skip = True
            elif not w.startswith("-"):
                positional.append(w)
        if fstype and fstype[0] in ("nfs", "nfs4") and len(positional) == 2:
            out.append((fstype[0], positional[0], positional[1]))
    return out


def run_options_for(cfg: dict, node_type: str) -> list[str]:
    """Effective docker run options of a node type, split into words."""
    docker = cfg.get("docker") or {}
    is_head = node_type == cfg["head_node_type"]
    opts = list(docker.get("run_options", []))
    opts += docker.get("head_run_options" if is_head else "worker_run_options", [])
    if not is_head:
        node_docker = cfg["available_node_types"][node_type].get("docker") or {}
        opts += node_docker.get("worker_run_options", [])
    return [w for opt in opts for w in shlex.split(str(opt))]


def image_problem(image: str) -> str | None:
    """Why an image reference is not a pinned image in a real registry (None if it is)."""
    if not image:
        return "no image"
    name, _, tag = image.rpartition(":")
    if "@sha256:" in image:
        return None
    if not name or "/" in tag:
        return f"image {image!r} has no tag"
    if tag == "latest" or tag.startswith("latest"):
        return f"image {image!r} uses a ':latest' tag"
    registry = name.split("/")[0]
    if "/" not in name or ("." not in registry and ":" not in registry):
        return f"image {image!r} does not name a registry (e.g. ghcr.io/...)"
    return None


# --------------------------------------------------------------------------- project rules


def cluster_problems(cfg: dict) -> list[str]:
    """Every violation of the project's cluster rules in a config (empty list = fine)."""
    p: list[str] = []
    provider = cfg["provider"]["type"]
    node_types = cfg["available_node_types"]
    head = cfg["head_node_type"]

    # Dashboard and jobs API on localhost only; token authentication everywhere.
    head_cmd = ray_start(cfg.get("head_start_ray_commands", []), head=True)
    head_words = shlex.split(head_cmd.replace(";", " ; "))
    hosts = flag_values(head_words, "--dashboard-host")
    if hosts != ["127.0.0.1"]:
        p.append(f"dashboard: --dashboard-host must be 127.0.0.1 (SSH tunnel only), got {hosts}")
    head_env = exported(head_cmd)
    if head_env.get("RAY_AUTH_MODE") != "token":
        p.append("auth: head `ray start` does not export RAY_AUTH_MODE=token")
    worker_cmd = ray_start(cfg.get("worker_start_ray_commands", []), head=False)
    worker_env = exported(worker_cmd)
    if worker_env.get("RAY_AUTH_MODE") != "token":
        p.append("auth: worker `ray start` does not export RAY_AUTH_MODE=token")
    mounts = cfg.get("file_mounts") or {}
    token_targets = {remote for remote, local in mounts.items() if local == TOKEN_LOCAL_PATH}
    if not token_targets:
        p.append(f"auth: no file_mounts entry copies {TOKEN_LOCAL_PATH} to the nodes")
    for name, env in (("head", head_env), ("worker", worker_env)):
        path = env.get("RAY_AUTH_TOKEN_PATH")
        if path not in token_targets:
            p.append(f"auth: {name} RAY_AUTH_TOKEN_PATH={path} is not the file_mounts target of the token {sorted(token_targets)}")
    for node_type in node_types:
        words = run_options_for(cfg, node_type)
        if "RAY_AUTH_MODE=token" not in words:
            p.append(f"auth: docker run options of {node_type} lack -e RAY_AUTH_MODE=token")
        for w in words:
            if w.startswith("RAY_AUTH_TOKEN_PATH=") and w.split("=", 1)[1] not in token_targets:
                p.append(f"auth: docker {w} of {node_type} is not the mounted token file")

    # Results on a shared filesystem: every node mounts it on the host (NFS, before Docker
    # starts) and bind-mounts it into the container at the same path; the data is on it too.
    # Or, the bucket variant: the data (and run.root) in the provider's object store, credentials from
    # the node's own identity, never keys in the config.
    if storage_kind(cfg) == "bucket":
        return p + bucket_problems(cfg) + common_problems(cfg, head, head_cmd, worker_cmd)
    for node_type in node_types:
        init = initialization_commands_for(cfg, node_type)
        mounts = [m for c in init for m in nfs_mounts(c) if m[2].rstrip("/") == SHARED_ROOT]
        if not mounts:
            p.append(f"shared: {node_type} initialization_commands do not NFS-mount anything at {SHARED_ROOT}")
        if not any(re.search(rf"^\s*mountpoint -q {re.escape(SHARED_ROOT)}\s*$", c) for c in init):
            p.append(f"shared: {node_type} initialization_commands do not check `mountpoint -q {SHARED_ROOT}`")
        for fstype, source, _ in mounts:
            if provider == "aws":
                m = re.fullmatch(r"fs-[0-9a-zA-Z]+\.efs\.([a-z0-9-]+)\.amazonaws\.com:/\S*", source)
                if not m:
                    p.append(f"shared: {node_type} mounts {source!r}, not an EFS file system (fs-ID.efs.REGION.amazonaws.com:/)")
                elif m.group(1) != cfg["provider"].get("region"):
                    p.append(f"shared: {node_type} EFS region {m.group(1)} is not provider.region {cfg['provider'].get('region')}")
                if fstype != "nfs4":
                    p.append(f"shared: {node_type} mounts EFS as {fstype}, EFS needs nfs4")
            elif provider == "gcp" and not re.fullmatch(r"[^:/\s]+:/\S+", source):
                p.append(f"shared: {node_type} mounts {source!r}, not a Filestore share (IP:/share)")
        words = run_options_for(cfg, node_type)
        volumes = flag_values(words, "-v") + flag_values(words, "--volume")
        if f"{SHARED_ROOT}:{SHARED_ROOT}" not in {v.removesuffix(":rw") for v in volumes}:
            p.append(f"shared: docker run options of {node_type} do not bind-mount {SHARED_ROOT} at the same path, got {volumes}")
        data = docker_env(words).get("AKOD_DATA_DIR", "")
        if not data.startswith(SHARED_ROOT + "/"):
            p.append(f"data: docker run options of {node_type} must set AKOD_DATA_DIR under {SHARED_ROOT}, got {data!r}")
        for key, value in {**docker_env(words), **head_env, **worker_env}.items():
            if re.match(r"^[a-z0-9]+://", value) and key.startswith("AKOD"):
                p.append(f"storage: {key}={value} is a URI; the shared variant keeps run.root and the data on {SHARED_ROOT}")
    return p + common_problems(cfg, head, head_cmd, worker_cmd)


def storage_kind(cfg: dict) -> str:
    """"bucket" when the nodes read their data from an object store (AKOD_DATA_DIR is a URI), else "shared"."""
    datas = {docker_env(run_options_for(cfg, nt)).get("AKOD_DATA_DIR", "") for nt in cfg["available_node_types"]}
    return "bucket" if any(re.match(r"^[a-z0-9]+://", d) for d in datas) else "shared"


def bucket_problems(cfg: dict) -> list[str]:
    """The bucket variant: every node reads the same bucket of the provider's store, with credentials of its own
    identity (no keys in the config), and nothing to mount."""
    p: list[str] = []
    provider = cfg["provider"]["type"]
    scheme = BUCKET_SCHEMES.get(provider)
    for node_type, nt in cfg["available_node_types"].items():
        words = run_options_for(cfg, node_type)
        env = docker_env(words)
        data = env.get("AKOD_DATA_DIR", "")
        if not data.startswith(f"{scheme}://"):
            p.append(f"bucket: docker run options of {node_type} must set AKOD_DATA_DIR to a {scheme}:// URI, got {data!r}")
        if [m for c in initialization_commands_for(cfg, node_type) for m in nfs_mounts(c)]:
            p.append(f"bucket: {node_type} mounts a shared filesystem; the bucket variant keeps everything in the bucket")
        nc = nt.get("node_config") or {}
        if provider == "aws" and not (nc.get("IamInstanceProfile") or {}).get("Arn", (nc.get("IamInstanceProfile") or {}).get("Name")):
            p.append(f"bucket: {node_type} has no IamInstanceProfile (its credentials for the bucket)")
        if provider == "gcp":
            scopes = [s for a in nc.get("serviceAccounts") or [] for s in a.get("scopes", [])]
            if not any("devstorage" in s or "cloud-platform" in s for s in scopes):
                p.append(f"bucket: {node_type} has no service account with a Cloud Storage scope")
    datas = {docker_env(run_options_for(cfg, nt)).get("AKOD_DATA_DIR") for nt in cfg["available_node_types"]}
    if len(datas) != 1:
        p.append(f"bucket: the nodes read different data folders {sorted(map(str, datas))}")
    commands = [c for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands",
                              "initialization_commands") for c in cfg.get(key) or []]
    texts = commands + [w for nt in cfg["available_node_types"] for w in run_options_for(cfg, nt)]
    for name in SECRET_VARIABLES:
        if any(name in t for t in texts):
            p.append(f"bucket: {name} is set in the config; credentials come from the nodes' identity, not keys")
    return p


def common_problems(cfg: dict, head: str, head_cmd: str, worker_cmd: str) -> list[str]:
    """The rules of both storage variants: resources, GPUs, spot, image, /dev/shm, network."""
    p: list[str] = []
    provider = cfg["provider"]["type"]
    node_types = cfg["available_node_types"]
    workers = {k: v for k, v in node_types.items() if k != head}

    # Trial drivers on the CPU head (custom resource), GPUs on workers only.
    head_res = node_types[head].get("resources") or {}
    if head_res.get("TRAIN_DRIVER", 0) < 1:
        p.append("resources: head does not advertise TRAIN_DRIVER")
    if head_res.get("GPU", 0):
        p.append("resources: head advertises GPUs")
    if not workers:
        p.append("workers: no worker node type")
    for name, nt in workers.items():
        res = nt.get("resources") or {}
        nc = nt.get("node_config") or {}
        if res.get("TRAIN_DRIVER"):
            p.append(f"resources: worker {name} advertises TRAIN_DRIVER (trial drivers would start GPU nodes)")
        if nt.get("min_workers", 0) != 0:
            p.append(f"workers: {name} min_workers must be 0 (scale from zero)")
        if provider == "aws":
            itype = nc.get("InstanceType")
            if itype not in AWS_GPU_TYPES:
                p.append(f"gpu: worker {name} InstanceType {itype!r} is not an 8x A100 type {sorted(AWS_GPU_TYPES)}")
            if res.get("GPU") not in (None, AWS_GPU_TYPES.get(itype)):
                p.append(f"gpu: worker {name} declares {res.get('GPU')} GPUs for {itype}")
            if (nc.get("InstanceMarketOptions") or {}).get("MarketType") != "spot":
                p.append(f"spot: worker {name} is not a spot instance")
        elif provider == "gcp":
            mtype = str(nc.get("machineType", ""))
            m = re.fullmatch(r"a2-(?:highgpu|megagpu|ultragpu)-(\d+)g", mtype)
            if not m:
                p.append(f"gpu: worker {name} machineType {mtype!r} is not an A2 (A100) type")
            elif res.get("GPU") != int(m.group(1)):
                p.append(f"gpu: worker {name} resources GPU={res.get('GPU')} but {mtype} has {m.group(1)}")
            sched = nc.get("scheduling")
            if not isinstance(sched, dict):
                p.append(f"gcp: worker {name} scheduling must be one mapping (GCP API object), got {type(sched).__name__}")
                sched = {}
            if sched.get("onHostMaintenance") != "TERMINATE":
                p.append(f"gcp: worker {name} needs scheduling.onHostMaintenance: TERMINATE (GPU VMs)")
            if sched.get("provisioningModel") != "SPOT" and sched.get("preemptible") is not True:
                p.append(f"spot: worker {name} is not a spot VM")
        else:
            p.append(f"provider: unsupported type {provider!r}")

    # Docker: pinned image in a registry; /dev/shm larger than the object store.
    docker = cfg.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        if key in docker or key == "image":
            why = image_problem(str(docker.get(key, "")))
            if why:
                p.append(f"image: docker.{key}: {why}")
    start_cmds = {head: head_cmd}
    start_cmds.update({w: worker_cmd for w in workers})
    for node_type, cmd in start_cmds.items():
        shm = flag_values(run_options_for(cfg, node_type), "--shm-size")
        if not shm:
            p.append(f"shm: no --shm-size in the docker run options of {node_type}")
            continue
        store = flag_values(shlex.split(cmd.replace(";", " ; ")), "--object-store-memory")
        if store and docker_size(shm[-1]) <= int(store[-1]):
            p.append(f"shm: {node_type} --shm-size={shm[-1]} is not larger than --object-store-memory={store[-1]}")

    # Inbound traffic: SSH only.
    all_node_configs = [nt.get("node_config") or {} for nt in node_types.values()]
    if provider == "aws":
        sg = cfg["provider"].get("security_group")
        if sg is None:
            p.append("network: provider.security_group not set (state the inbound rules explicitly)")
        else:
            for rule in sg.get("IpPermissions", []):
                if (rule.get("FromPort"), rule.get("ToPort")) != (22, 22):
                    p.append(f"network: extra inbound rule {rule} (only SSH, port 22, is allowed)")
        if any("SecurityGroupIds" in nc for nc in all_node_configs):
            p.append("network: SecurityGroupIds bypasses the launcher's SSH-only security group")
        if cfg["provider"].get("cache_stopped_nodes", True):
            p.append("aws: cache_stopped_nodes must be false (spot instances cannot be stopped)")
    if provider == "gcp":
        for nc in all_node_configs:
            tags = (nc.get("tags") or {}).get("items", [])
            if {"http-server", "https-server"} & set(tags):
                p.append(f"network: network tags {tags} open HTTP(S) on the default VPC")
    return p


# --------------------------------------------------------------------------- tests


def test_cluster_configs_exist():
    names = {c.name for c in CONFIGS}
    assert {"a100.yaml", "gcp-a2.yaml", "a100-s3.yaml"} <= names, names
    assert load(CLUSTER_DIR / "a100.yaml")["cluster_name"] == "akod-a100"
    assert storage_kind(load(CLUSTER_DIR / "a100.yaml")) == "shared"
    assert storage_kind(load(CLUSTER_DIR / "a100-s3.yaml")) == "bucket"


def test_the_bucket_variant_differs_from_the_shared_one_in_storage_only():
    """a100-s3.yaml is a100.yaml with the bucket in place of the EFS: the same nodes, image, resources, start
    commands and network rules."""
    shared, bucket = load(CLUSTER_DIR / "a100.yaml"), load(CLUSTER_DIR / "a100-s3.yaml")
    for key in ("max_workers", "head_node_type", "file_mounts", "head_start_ray_commands", "worker_start_ray_commands",
                "setup_commands"):
        assert shared[key] == bucket[key], key
    for name, nt in shared["available_node_types"].items():
        other = bucket["available_node_types"][name]
        assert {k: v for k, v in nt["node_config"].items() if k != "IamInstanceProfile"} == \
            {k: v for k, v in other["node_config"].items() if k != "IamInstanceProfile"}
        assert nt["resources"] == other["resources"]
    assert shared["docker"]["image"] == bucket["docker"]["image"]
    broken = copy.deepcopy(bucket)
    del broken["available_node_types"]["ray.worker.p4d"]["node_config"]["IamInstanceProfile"]
    broken["docker"]["run_options"].append("-e AWS_SECRET_ACCESS_KEY=oops")
    problems = cluster_problems(broken)
    assert any("ray.worker.p4d has no IamInstanceProfile" in x for x in problems), problems
    assert any("AWS_SECRET_ACCESS_KEY is set in the config" in x for x in problems), problems


@pytest.mark.parametrize("path", CONFIGS, ids=lambda c: c.name)
def test_ray_validator_accepts_offline(path, no_network):
    prepared = ray_validate(load(path))
    # prepare_config really merged Ray's defaults and filled the worker counts.
    assert "cluster_synced_files" in prepared
    head = prepared["head_node_type"]
    assert prepared["available_node_types"][head]["max_workers"] == 0
    total_max = sum(nt["max_workers"] for nt in prepared["available_node_types"].values())
    assert 1 <= total_max and all(nt["max_workers"] <= prepared["max_workers"]
                                  for nt in prepared["available_node_types"].values())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda c: c.name)
def test_ray_defaults_do_not_leak_in(path):
    """Ray's defaults.yaml is merged key by key: any command list left out would bring its
    default, which pip-installs a nightly Ray wheel over the image's pinned Ray."""
    prepared = ray_validate(load(path))
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in prepared[key]]
    assert not [c for c in commands if "ray-wheels" in c or "dev0" in c or re.search(r"pip install[^;&]*\bray\b", c)]
    # Ray itself comes from the image: only the autoscaler's cloud client is installed.
    assert all("pip install" not in c for c in prepared["worker_setup_commands"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda c: c.name)
def test_project_rules(path):
    cfg = load(path)
    ray_validate(cfg)  # the rules assume a valid config
    assert cluster_problems(cfg) == []


def test_cluster_sweep_config_writes_to_the_shared_filesystem():
    with open(CLUSTER_SWEEP_CONFIG) as f:
        sweep = yaml.safe_load(f)
    root = sweep["run"]["root"]
    assert root.startswith(SHARED_ROOT + "/"), f"{CLUSTER_SWEEP_CONFIG.name}: run.root {root!r} is not on {SHARED_ROOT}"
    assert sweep["train"].get("use_gpu") is True


def test_helpers():
    assert docker_size("20g") == 20 * 1024**3
    assert docker_size("'512m'") == 512 * 1024**2
    assert docker_size("110GB") == 110 * 1024**3
    assert docker_size("1048576") == 1048576
    with pytest.raises(ValueError):
        docker_size("lots")
    assert exported("export A=1 B='x y'; ulimit -n 5; ray start") == {"A": "1", "B": "x y"}
    assert flag_values(["ray", "start", "--dashboard-host", "0.0.0.0", "--x=1"], "--dashboard-host") == ["0.0.0.0"]
    assert image_problem("ghcr.io/akod-ray/akod-ray:0.1.0") is None
    assert image_problem("akod-ray:latest") is not None
    assert image_problem("ghcr.io/akod-ray/akod-ray:latest") is not None
    assert image_problem("ghcr.io/akod-ray/akod-ray") is not None
    assert image_problem("akod-ray:0.1.0") is not None  # no registry
    assert nfs_mounts("mountpoint -q /m || { sudo mkdir -p /m && sudo mount -t nfs4 -o a=1,hard fs-1.efs.r.amazonaws.com:/ /m; }") \
        == [("nfs4", "fs-1.efs.r.amazonaws.com:/", "/m")]
    assert nfs_mounts("sudo mount -t ext4 /dev/x /m") == []
    assert docker_env(["-e", "A=1", "--env", "B=x=y", "-v", "/a:/a"]) == {"A": "1", "B": "x=y"}


# --------------------------------------------------------------------------- can they fail?


def test_validator_rejects_unknown_top_level_key():
    cfg = load(CLUSTER_DIR / "a100.yaml")
    cfg["max_wrokers"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_wrokers"):
        ray_validate(cfg)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda c: c.name)
def test_validator_rejects_unknown_node_type_key(path):
    cfg = load(path)
    worker = next(k for k in cfg["available_node_types"] if k != cfg["head_node_type"])
    cfg["available_node_types"][worker]["min_worker"] = 0  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        ray_validate(cfg)


def test_validator_rejects_unknown_docker_key_and_bad_counts():
    cfg = load(CLUSTER_DIR / "a100.yaml")
    cfg["docker"]["shm_size"] = "20g"  # not a launcher key: must go in run_options
    with pytest.raises(jsonschema.ValidationError, match="shm_size"):
        ray_validate(cfg)
    cfg = load(CLUSTER_DIR / "a100.yaml")
    worker = next(k for k in cfg["available_node_types"] if k != cfg["head_node_type"])
    cfg["available_node_types"][worker]["min_workers"] = cfg["max_workers"] + 1
    with pytest.raises(ValueError, match="min_workers"):
        ray_validate(cfg)


def _head_cmd_sub(old, new):
    def mutate(cfg):
        cmds = cfg["head_start_ray_commands"]
        k = next(i for i, c in enumerate(cmds) if "--head" in c)
        assert old in cmds[k]
        cmds[k] = cmds[k].replace(old, new)
    return mutate


def _worker(cfg):
    return next(v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"])


def _set(path_fn, key, value):
    def mutate(cfg):
        path_fn(cfg)[key] = value
    return mutate


def _del(path_fn, key):
    def mutate(cfg):
        del path_fn(cfg)[key]
    return mutate


COMMON_MUTATIONS = {
    "public dashboard": (_head_cmd_sub("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"), "dashboard:"),
    "no token auth": (_head_cmd_sub("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"), "auth: head"),
    "token path mismatch": (_head_cmd_sub("RAY_AUTH_TOKEN_PATH=/home/ray/.akod/ray_auth_token",
                                          "RAY_AUTH_TOKEN_PATH=/tmp/elsewhere"), "auth: head RAY_AUTH_TOKEN_PATH"),
    "storage uri": (_head_cmd_sub("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=token AKOD_STORAGE_PATH=s3://b/runs"),
                    "storage:"),
    "no host mount": (_set(lambda c: c, "initialization_commands", []), "NFS-mount"),
    "worker overrides host mount": (_set(_worker, "initialization_commands", ["echo no mount"]),
                                    "initialization_commands do not NFS-mount"),
    "no mount check": (lambda c: c["initialization_commands"].remove("mountpoint -q /mnt/akod-shared"),
                       "mountpoint -q"),
    "mount elsewhere": (lambda c: c.update(initialization_commands=[x.replace("/mnt/akod-shared", "/mnt/other")
                                                                     for x in c["initialization_commands"]]),
                        "NFS-mount"),
    "no container mount": (lambda c: c["docker"]["run_options"].remove("-v /mnt/akod-shared:/mnt/akod-shared"),
                           "bind-mount"),
    "container path differs": (lambda c: c["docker"].update(run_options=[
        o.replace("-v /mnt/akod-shared:/mnt/akod-shared", "-v /mnt/akod-shared:/data") for o in c["docker"]["run_options"]]),
        "bind-mount"),
    "data off the share": (lambda c: c["docker"].update(run_options=[
        o.replace("AKOD_DATA_DIR=/mnt/akod-shared/data/cifar10", "AKOD_DATA_DIR=/home/ray/data")
        for o in c["docker"]["run_options"]]), "data:"),
    "latest image": (_set(lambda c: c["docker"], "image", "ghcr.io/akod-ray/akod-ray:latest"), "':latest'"),
    "placeholder image": (_set(lambda c: c["docker"], "image", "akod-ray:0.1.0"), "registry"),
    "no head shm": (_set(lambda c: c["docker"], "head_run_options", []), "shm: no --shm-size"),
    "small worker shm": (_set(lambda c: c["docker"], "worker_run_options", ["--shm-size=1g"]), "not larger than"),
    "no driver resource": (lambda c: c["available_node_types"][c["head_node_type"]]["resources"].pop("TRAIN_DRIVER"),
                           "TRAIN_DRIVER"),
    "driver on gpu node": (lambda c: _worker(c)["resources"].update(TRAIN_DRIVER=1), "advertises TRAIN_DRIVER"),
    "gpu on head": (lambda c: c["available_node_types"][c["head_node_type"]]["resources"].update(GPU=1),
                    "head advertises GPUs"),
    "no token mount": (_set(lambda c: c, "file_mounts", {}), "no file_mounts entry"),
    "min workers": (_set(_worker, "min_workers", 1), "min_workers must be 0"),
}

AWS_MUTATIONS = {
    "open dashboard port": (lambda c: c["provider"]["security_group"]["IpPermissions"].append(
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}),
        "extra inbound rule"),
    "cpu worker": (lambda c: _worker(c)["node_config"].update(InstanceType="m5.24xlarge"), "gpu:"),
    "on demand": (lambda c: _worker(c)["node_config"].pop("InstanceMarketOptions"), "spot:"),
    "efs in another region": (lambda c: c.update(initialization_commands=[
        x.replace(".efs.us-west-2.", ".efs.us-east-1.") for x in c["initialization_commands"]]), "EFS region"),
    "nfs3 efs": (lambda c: c.update(initialization_commands=[
        x.replace("mount -t nfs4", "mount -t nfs") for x in c["initialization_commands"]]), "EFS needs nfs4"),
    "s3 instead of efs": (lambda c: c.update(initialization_commands=[
        x.replace("fs-EDIT.efs.us-west-2.amazonaws.com:/", "s3.amazonaws.com:/bucket") for x in c["initialization_commands"]]),
        "not an EFS"),
    "own security group": (lambda c: _worker(c)["node_config"].update(SecurityGroupIds=["sg-1"]), "bypasses"),
    "stopped spot": (_set(lambda c: c["provider"], "cache_stopped_nodes", True), "cache_stopped_nodes"),
}

GCP_MUTATIONS = {
    "no terminate": (lambda c: _worker(c)["node_config"]["scheduling"].pop("onHostMaintenance"), "TERMINATE"),
    "list scheduling": (lambda c: _worker(c)["node_config"].update(scheduling=[{"onHostMaintenance": "TERMINATE"}]),
                        "one mapping"),
    "gpu count": (lambda c: _worker(c)["resources"].update(GPU=4), "gpu:"),
    "cpu worker": (lambda c: _worker(c)["node_config"].update(machineType="n2-standard-96"), "gpu:"),
    "http tag": (lambda c: _worker(c)["node_config"].update(tags={"items": ["http-server"]}), "network tags"),
    "not a filestore share": (lambda c: c.update(initialization_commands=[
        x.replace("FILESTORE-IP:/akod", "/dev/sdb") for x in c["initialization_commands"]]), "not a Filestore share"),
}


# the shared-filesystem rules: mounts, EFS, the data on the share (not for the bucket variant, which mounts nothing)
SHARED_ONLY = {"storage uri", "no host mount", "worker overrides host mount", "no mount check", "mount elsewhere",
               "no container mount", "container path differs", "data off the share", "efs in another region",
               "nfs3 efs", "s3 instead of efs", "not a filestore share"}


def _set_data(value: str):
    def mutate(cfg):
        docker = cfg["docker"]
        for key in ("run_options", "head_run_options", "worker_run_options"):
            docker[key] = [re.sub(r"AKOD_DATA_DIR=\S+", f"AKOD_DATA_DIR={value}", o) for o in docker.get(key) or []]
    return mutate


BUCKET_MUTATIONS = {
    # data on a path makes it the shared variant, whose mounts are missing
    "data on a local path": (_set_data("/mnt/akod-shared/data/cifar10"), "do not NFS-mount"),
    "data in another store": (_set_data("gs://akod-data/cifar10"), "s3:// URI"),
    "a shared mount beside the bucket": (_set(lambda c: c, "initialization_commands", [
        "sudo mount -t nfs4 fs-1.efs.us-west-2.amazonaws.com:/ /mnt/akod-shared"]), "mounts a shared filesystem"),
    "no instance profile": (lambda c: _worker(c)["node_config"].pop("IamInstanceProfile"), "IamInstanceProfile"),
    "keys in the config": (lambda c: c["docker"]["run_options"].append("-e AWS_SECRET_ACCESS_KEY=abc"),
                           "AWS_SECRET_ACCESS_KEY is set"),
}


def _cases():
    for path in CONFIGS:
        cfg = load(path)
        provider, kind = cfg["provider"]["type"], storage_kind(cfg)
        extra = {"aws": AWS_MUTATIONS, "gcp": GCP_MUTATIONS}.get(provider, {})
        cases = {**COMMON_MUTATIONS, **extra}
        if kind == "bucket":
            cases = {k: v for k, v in cases.items() if k not in SHARED_ONLY} | (
                BUCKET_MUTATIONS if provider == "aws" else {})
        for name, (mutate, expected) in cases.items():
            yield pytest.param(path, mutate, expected, id=f"{path.name}-{name}")


@pytest.mark.parametrize("path, mutate, expected", list(_cases()))
def test_project_rules_catch_broken_configs(path, mutate, expected):
    cfg = load(path)
    mutate(cfg)
    problems = cluster_problems(cfg)
    assert any(expected in p for p in problems), problems
