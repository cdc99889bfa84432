"""The deployment configs: ray_cluster.yaml, deploy/kuberay/*.yaml and deploy/local/.

Structural checks only: nothing here starts Ray, a cloud instance or a Kubernetes object.
Each file parses, holds what the launcher / operator needs with sane values, and every
project command it runs (and every command its README shows) exists: `vlm ...` argv parse
with the real parser, `python -m` modules import, `make` targets and repository paths
exist, `ray ...` flags appear in that subcommand's `--help`."""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RAY_CLUSTER = ROOT / "ray_cluster.yaml"
RAYCLUSTER_K8S = ROOT / "deploy/kuberay/raycluster.yaml"
RAYJOB_K8S = ROOT / "deploy/kuberay/rayjob.yaml"
READMES = [ROOT / "deploy/kuberay/README.md", ROOT / "deploy/local/README.md"]
SCRIPTS = [ROOT / "deploy/local/start-head.sh", ROOT / "deploy/local/start-worker.sh"]
RAY_BIN = Path(sys.executable).with_name("ray")
# Where the configs put this checkout: on the launcher's nodes and in the KubeRay image.
CHECKOUT_PREFIXES = ("~/vlm/", "/home/ubuntu/vlm/", "/app/")
REPO_DIRS = ("configs", "requirements", "deploy", "cluster", "data_pipeline")
SHELL_OPS = {"&&", "||", ";", "|", "(", ")", "&", "{", "}"}
REDIRECTS = {">", ">>", "<", ">&", "&>", "2>", "<<"}
GPU_INSTANCE = re.compile(r"^(p\d|g\d|trn\d|inf\d)")


def load(path: Path):
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def of_kind(docs: list, kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# ------------------------------------------------------------------ command checking

def _expand_vars(line: str) -> str:
    """Shell variables and substitutions as a placeholder word: their values exist only
    on the target machine."""
    line = re.sub(r"\$\([^()]*\)", "X", line)
    return re.sub(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*", "X", line)


def simple_commands(line: str) -> list[list[str]]:
    """A shell line as its simple commands' argv: split on && || ; | ( ), with env
    assignments, `sudo`, and redirections removed."""
    lexer = shlex.shlex(_expand_vars(line), posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    out, cur, skip = [], [], False
    for tok in lexer:
        if skip:
            skip = False
            continue
        if tok in SHELL_OPS:
            out.append(cur)
            cur = []
        elif tok in REDIRECTS or (tok and set(tok) <= set("<>&")):
            if cur and cur[-1].isdigit():
                cur.pop()
            skip = True
        else:
            cur.append(tok)
    out.append(cur)
    cmds = []
    for argv in out:
        while argv and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]) or argv[0] in ("sudo", "exec", "export")):
            argv = argv[1:]
        if argv:
            cmds.append(argv)
    return cmds


@functools.lru_cache(maxsize=None)
def ray_flags(sub: str) -> frozenset[str]:
    """The options of `ray SUB`, from its --help (run once per subcommand)."""
    res = subprocess.run([str(RAY_BIN), sub, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"`ray {sub}` is not a ray command: {res.stderr[-500:]}"
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", res.stdout))


@functools.lru_cache(maxsize=None)
def vlm_parser():
    from cluster.cli.main import build_parser

    return build_parser()


@functools.lru_cache(maxsize=None)
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(m for line in text.splitlines() for m in re.findall(r"^([\w.-]+)\s*:", line))


def repo_path(token: str) -> Path | None:
    """The repository file a token names (configs/x.yaml, ~/vlm/requirements/lock.txt,
    /app/configs/demo.yaml, --config.file=deploy/...), or None."""
    value = token.split("=", 1)[1] if token.startswith("-") and "=" in token else token
    for prefix in CHECKOUT_PREFIXES:
        if value.startswith(prefix):
            value = value[len(prefix):]
    if value.split("/", 1)[0] in REPO_DIRS and "/" in value and "X" not in value:
        return ROOT / value
    return None


def check_argv(argv: list[str], where: str) -> None:
    """Fails when a command the configs run names something this project does not have."""
    for tok in argv:
        path = repo_path(tok)
        if path is not None:
            assert path.exists(), f"{where}: {tok} names {path.relative_to(ROOT)}, which does not exist"
    name = Path(argv[0]).name
    if name == "vlm":
        check_vlm(argv[1:], where)
    elif re.fullmatch(r"python[\d.]*", name) and "-m" in argv:
        module = argv[argv.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        if module == "cluster.cli.main":
            check_vlm(argv[argv.index("-m") + 2:], where)
    elif name == "make":
        for target in (a for a in argv[1:] if not a.startswith("-") and "=" not in a):
            assert target in make_targets(), f"{where}: no make target {target!r}"
    elif name == "ray" or (argv[0] == "X" and len(argv) > 1 and argv[1] in ("start", "stop", "get-auth-token")):
        check_ray(argv[1:], where)


def check_vlm(args: list[str], where: str) -> None:
    parser = vlm_parser()
    if "--help" in args or "-h" in args:
        with pytest.raises(SystemExit) as e:
            parser.parse_args(args)
        assert e.value.code == 0, f"{where}: `vlm {' '.join(args)}` does not parse"
        return
    try:
        parser.parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"{where}: `vlm {' '.join(args)}` does not parse (exit {e.code})") from None


def check_ray(args: list[str], where: str) -> None:
    sub = args[0]
    flags = ray_flags(sub)
    for tok in args[1:]:
        if tok.startswith("-"):
            flag = tok.split("=", 1)[0]
            assert flag in flags, f"{where}: `ray {sub}` has no option {flag}"
    if sub in ("exec", "attach"):  # the command it runs on the cluster
        quoted = [a for a in args[2:] if not a.startswith("-") and " " in a]
        for line in quoted:
            for argv in simple_commands(line):
                check_argv(argv, where)


def check_line(line: str, where: str) -> None:
    for argv in simple_commands(line):
        check_argv(argv, where)


COMMAND_WORDS = {"vlm", "ray", "make", "python", "kubectl", "docker", "aws", "ssh", "prometheus", "helm"}


def comment_commands(path: Path) -> list[str]:
    """Example commands in a YAML file's comments: lines `#   COMMAND` (3+ spaces) whose first word
    (after VAR=value words) is a command, with `\\` continuations joined."""
    lines = [m.group(1) for m in re.finditer(r"^\s*#\s{3,}(\S.*)$", path.read_text(), re.M)]
    out = []
    for line in _join_continuations(lines):
        words = [w for w in line.split() if not re.match(r"^[A-Za-z_]\w*=", w) and w != "export"]
        if not words or words[0] in COMMAND_WORDS or words[0].startswith(".venv/"):
            out.append(line)
    return out


def readme_commands(path: Path) -> list[str]:
    """Every line of every fenced code block but Dockerfiles and sample output."""
    out = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", path.read_text(), re.S):
        if lang:
            continue
        out += [ln for ln in _join_continuations(body.splitlines()) if not ln.startswith(("$", "vlm: "))]
    return out


def _join_continuations(lines: list[str]) -> list[str]:
    out, cur = [], ""
    for ln in lines:
        ln = re.sub(r"\s+#\s.*$", "", ln).strip()
        if ln.endswith("\\"):
            cur += ln[:-1] + " "
        else:
            out.append(cur + ln)
            cur = ""
    return [c for c in out if c]


# ------------------------------------------------------------------ the command checker itself

def test_command_checker_rejects_what_does_not_exist():
    """The checks below are only as good as this: each broken command must fail."""
    check_line("cd ~/vlm && .venv/bin/vlm cluster run --config /app/configs/demo.yaml --name x", "ok")
    check_line("vlm cluster submit --config configs/demo.yaml --name ${NAME} --set a.b=$(pwd)", "ok")
    for bad in ("vlm cluster runn --config configs/demo.yaml",       # a typo in a subcommand
                "vlm cluster run --name x",                          # a required option missing
                "vlm cluster run --config configs/nope.yaml",        # a config that is not there
                "cd ~/vlm && pip install -c requirements/lock.tx torch",
                "python -m cluster.nope",
                "make demoo",
                "ray start --head --dashboard-hots=127.0.0.1",
                "ray exec c.yaml 'cd ~/vlm && make nope'"):
        with pytest.raises(AssertionError):
            check_line(bad, "bad")


# ------------------------------------------------------------------ ray_cluster.yaml

@pytest.fixture(scope="module")
def cluster():
    return load(RAY_CLUSTER)


def test_ray_cluster_matches_rays_schema(cluster):
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)  # what `ray up` validates against


def test_ray_cluster_provider_and_scaling(cluster):
    provider = cluster["provider"]
    assert provider["type"] == "aws"
    assert re.fullmatch(r"[a-z]{2}-[a-z]+-\d", provider["region"])
    zones = provider["availability_zone"].split(",")
    assert zones and all(z.startswith(provider["region"]) for z in zones)
    assert isinstance(provider["cache_stopped_nodes"], bool)
    assert cluster["auth"]["ssh_user"]
    assert cluster["max_workers"] >= 1 and cluster["upscaling_speed"] > 0
    assert cluster["idle_timeout_minutes"] > 0


def test_ray_cluster_head_is_cpu_only_and_a_gpu_type_scales(cluster):
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("GPU", 0) == 0
    assert not GPU_INSTANCE.match(types[head]["node_config"]["InstanceType"])
    gpu_types = {k: t for k, t in types.items() if k != head and t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker type with GPU resources"
    for name, t in gpu_types.items():
        assert GPU_INSTANCE.match(t["node_config"]["InstanceType"]), name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"], name


def test_ray_cluster_installs_like_the_makefile(cluster):
    setup = cluster["setup_commands"]
    assert (ROOT / "requirements/lock.txt").is_file()

    def index(pred, what):
        hits = [i for i, c in enumerate(setup) if pred(c)]
        assert hits, f"no setup command {what}"
        return hits[0]

    torch = index(lambda c: re.search(r"pip install .*\btorch$", c) and "requirements/lock.txt" in c,
                  "installing torch under a constraint made from requirements/lock.txt")
    base = index(lambda c: re.search(r"pip install .*-c \S+ -r requirements/base\.txt", c), "for base.txt")
    ds = index(lambda c: re.search(r"pip install .*-c \S+ --no-build-isolation deepspeed", c),
               "for deepspeed without build isolation")
    project = index(lambda c: re.search(r"pip install .*--no-deps.* -e \.$", c), "for the project")
    assert torch < base < ds < project
    constraints = re.search(r"-c (\S+)", setup[base]).group(1)
    assert constraints == re.search(r"-c (\S+)", setup[ds]).group(1)
    assert constraints == "requirements/lock.txt" or re.search(
        rf"requirements/lock\.txt[^;&]*> {re.escape(constraints)}", setup[torch]), "base.txt not under the lock"
    assert any("-c requirements/lock.txt" in c for c in setup[:torch])
    assert "download.pytorch.org/whl/cu" in setup[torch], "GPU nodes need the CUDA build of torch"


def _ray_start(commands: list[str]) -> tuple[list[str], str]:
    for line in commands:
        for argv in simple_commands(line):
            if Path(argv[0]).name == "ray" and argv[1:2] == ["start"]:
                return argv, line
    pytest.fail("no `ray start` command")


def test_ray_cluster_start_commands(cluster):
    prom = load(ROOT / "deploy/prometheus/prometheus.yml")
    sd_dir = str(Path(prom["scrape_configs"][0]["file_sd_configs"][0]["files"][0]).parent)
    head, head_line = _ray_start(cluster["head_start_ray_commands"])
    worker, worker_line = _ray_start(cluster["worker_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert any(a.startswith("--address=$RAY_HEAD_IP:") for a in shlex.split(worker_line.split("ray start", 1)[1]))
    for argv, line in ((head, head_line), (worker, worker_line)):
        assert any(a.startswith("--metrics-export-port=") for a in argv)
        before_start = line.split("ray start", 1)[0]
        assert "RAY_AUTH_MODE=token" in before_start, "token auth must be on for every node"
        assert f"VLM_METRICS_SD_DIR={sd_dir}" in before_start, "exporters must announce where Prometheus looks"
        assert ".venv/bin/activate" in before_start, "jobs must run the venv's python"


def test_ray_cluster_mounts_the_checkout_and_the_token(cluster):
    mounts = cluster["file_mounts"]
    remote = [r for r, local in mounts.items() if local == "."]
    assert remote == [f"/home/{cluster['auth']['ssh_user']}/vlm"], "the checkout is not mounted at ~/vlm"
    assert all("cd ~/vlm" in c for c in cluster["setup_commands"] if ".venv/bin/" in c)
    assert any(local.endswith(".ray/auth_token") for local in mounts.values())
    assert ".venv" in cluster["rsync_exclude"]


def test_ray_cluster_commands_exist(cluster):
    lines = (cluster["setup_commands"] + cluster["head_setup_commands"] + cluster["worker_setup_commands"]
             + cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
             + comment_commands(RAY_CLUSTER))
    assert any("vlm cluster submit" in ln for ln in lines)
    for line in lines:
        check_line(line, "ray_cluster.yaml")


# ------------------------------------------------------------------ KubeRay

def _lock_version(package: str) -> str:
    m = re.search(rf"^{package}==([^\s+]+)", (ROOT / "requirements/lock.txt").read_text(), re.M)
    return m.group(1)


def check_ray_cluster_spec(spec: dict, where: str) -> list[dict]:
    """Checks one RayClusterSpec; returns its pod templates."""
    from cluster.ray.session import LOOPBACK_ENV, worker_env

    assert spec["rayVersion"] == _lock_version("ray"), f"{where}: rayVersion is not the locked ray"
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert "dashboard-host" in params and params["metrics-export-port"].isdigit(), where
    if params["dashboard-host"] not in ("127.0.0.1", "localhost"):
        assert spec["authOptions"]["mode"] == "token", f"{where}: a reachable job server needs token auth"
    assert params.get("num-cpus") == "0", f"{where}: training must not land on the head"
    head_c = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_c["resources"].get("limits", {}), where

    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, f"{where}: no worker group with nvidia.com/gpu limits"
    want_env = {k for k in worker_env() if k not in LOOPBACK_ENV}
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] >= 1, f"{where}: {g['groupName']}"
        assert g["rayStartParams"]["metrics-export-port"].isdigit()
        c = g["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert want_env <= set(env), f"{where}: worker env lacks {want_env - set(env)}"
        assert env["DS_ACCELERATOR"] == "cuda"
    templates = [head["template"]] + [g["template"] for g in groups]
    for t in templates:
        pod = t["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            assert c["image"] == head_c["image"], f"{where}: one image for every pod"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{where}: mount of undeclared volume {m['name']}"
    return templates


def _claims(templates: list[dict]) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for t in templates
            for v in t["spec"].get("volumes", []) if "persistentVolumeClaim" in v}


def test_kuberay_raycluster():
    docs = load_all(RAYCLUSTER_K8S)
    rc = of_kind(docs, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    templates = check_ray_cluster_spec(rc["spec"], "raycluster.yaml")
    pvcs = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert _claims(templates) <= pvcs
    policy = of_kind(docs, "NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for t in templates:  # the policy must cover every Ray pod
        assert selector.items() <= t["metadata"]["labels"].items()


def test_kuberay_rayjob():
    job = of_kind(load_all(RAYJOB_K8S), "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
    templates = check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    if spec["submissionMode"] == "SidecarMode":
        assert templates[0]["spec"]["restartPolicy"] == "Never"
    rc = of_kind(load_all(RAYCLUSTER_K8S), "RayCluster")
    assert _claims(templates) <= {d["metadata"]["name"] for d in load_all(RAYCLUSTER_K8S)
                                  if d["kind"] == "PersistentVolumeClaim"}
    assert templates[0]["spec"]["containers"][0]["image"] == \
        rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]

    argv = simple_commands(spec["entrypoint"])
    assert len(argv) == 1 and argv[0][:3] == ["vlm", "cluster", "run"]
    check_argv(argv[0], "rayjob.yaml entrypoint")
    assert any(repo_path(a) for a in argv[0]), "the entrypoint's --config is not a file of the image"
    # the job trains on as many GPUs as its worker groups hold
    from vlm.config import load_config

    args = vlm_parser().parse_args(argv[0][1:])
    cfg = load_config(repo_path(args.config), args.overrides)
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.train.num_workers == gpus


def test_kuberay_yaml_commands_exist():
    for path in (RAYCLUSTER_K8S, RAYJOB_K8S):
        for line in comment_commands(path):
            check_line(line, path.name)


# ------------------------------------------------------------------ deploy/local and the READMEs

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_local_script(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert re.search(r"^set -euo pipefail$", text, re.M)
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    header = text.split("set -euo pipefail", 1)[0]
    for name in re.findall(r'^(\w+)="\$\{\1:-', text, re.M):  # every parameter is documented
        assert re.search(rf"#\s+{name}\b", header), f"{script.name}: {name} not in the header"
    # the `ray` arguments it builds, and every other ray call
    arrays = re.findall(r"^args\+?=\((.*?)\)", text, re.M | re.S)
    assert arrays and arrays[0].split()[0] == "start"
    start = "ray " + " ".join(" ".join(a.split()) for a in arrays)
    check_line(start, script.name)
    # each node on a loopback address of its own, not 127.0.0.1 (Ray would turn that into
    # the machine's outward address: start-head.sh)
    assert '--node-ip-address="$NODE_IP"' in start
    node_ip = re.search(r'^NODE_IP="\$\{NODE_IP:-(127\.\d+\.\d+\.\d+)\}"$', text, re.M)
    assert node_ip and node_ip.group(1) != "127.0.0.1", script.name
    if "--head" in start:
        assert "--dashboard-host=127.0.0.1" in start
    else:
        assert re.search(r'HEAD_ADDRESS="\$\{HEAD_ADDRESS:-127\.0\.0\.2:6379\}"', text)
    for line in re.findall(r'^\s*"\$RAY" (?!"\$\{args)(.*)$', text, re.M):
        check_line("ray " + line, script.name)


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.parent.name)
def test_readme_commands_exist(readme):
    lines = readme_commands(readme)
    assert any(re.search(r"\bvlm cluster (submit|status)", ln) for ln in lines)
    for line in lines:
        check_line(line, str(readme.relative_to(ROOT)))


def test_local_nodes_have_temp_dirs_of_their_own():
    """Two nodes in one temp dir delete each other's job working dirs and forward every worker
    line twice (deploy/local/README.md): each script passes a default of its own node's."""
    defaults = {}
    for script in SCRIPTS:
        text = script.read_text()
        start = " ".join(re.findall(r"^args\+?=\((.*?)\)", text, re.M | re.S)[0].split())
        assert '--temp-dir="$RAY_TEMP_DIR"' in start, f"{script.name}: no --temp-dir"
        defaults[script.name] = re.search(r'^RAY_TEMP_DIR="\$\{RAY_TEMP_DIR:-(\S+)\}"$', text, re.M).group(1)
    assert defaults == {"start-head.sh": "/tmp/ray-vlm-head-$RAY_PORT",
                        "start-worker.sh": "/tmp/ray-vlm-worker-$AGENT_PORT"}
    # the longest unix socket Ray puts there, at the longest port, within AF_UNIX's 107 bytes
    socket = "/session_2026-12-07_11-44-07_128170_30211/sockets/plasma_store.1"
    assert all(len(re.sub(r"\$\w+", "65535", d) + socket) < 107 for d in defaults.values())
