"""deploy/: what can be checked without Docker or Kubernetes.

- The RayService embeds deploy/serve-config.yaml verbatim, and every rendered file (deploy/render.py)
  is current; drift is detected.
- The Serve config embedded in the RayService passes Ray Serve's schema and its import path imports.
- The RayService's groups are the farm's VRAM classes (GPU limits, class resources, replica bounds),
  its settings agree with the Serve config, its volumes, Secret and Services are the ones the other
  manifests create, and the monitoring manifests select the pods and ports it has.
- The compose file parses, references only files that exist and variables .env.example defines,
  runs the same application and settings, and its Prometheus config passes promtool in the
  container's layout.
- The Dockerfile (and ray-cluster.yaml) install exactly the versions the project pins.
- The compose GPU worker's entrypoint: class checks, the `ray start` line, the plan for a host.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from cluster.gpus import LocalGpu
from cluster.vram_classes import HEAD_RESOURCE, default_classes

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVE_CONFIG = DEPLOY / "serve-config.yaml"
KUBERAY = DEPLOY / "kuberay"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
GiB = 2**30


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_module("deploy_render", DEPLOY / "render.py")
gpu_worker = _load_module("deploy_compose_gpu_worker", COMPOSE_DIR / "gpu_worker.py")


def serve_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def app_args() -> dict:
    return serve_config()["applications"][0]["args"]


def bucket_of(storage_url: str) -> str:
    assert storage_url.startswith("s3://"), storage_url
    return storage_url[len("s3://"):].partition("/")[0]


def k8s_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def k8s_doc(name: str, kind: str, doc_name: str | None = None) -> dict:
    found = [d for d in k8s_docs(name) if d["kind"] == kind and (doc_name is None or d["metadata"]["name"] == doc_name)]
    assert len(found) == 1, f"{name}: expected one {kind} {doc_name or ''}, found {len(found)}"
    return found[0]


def rayservice() -> dict:
    return k8s_doc("rayservice.yaml", "RayService")


def ray_start_resources(value: str) -> dict:
    """KubeRay's rayStartParams `resources` format: a JSON object inside a quoted string."""
    assert value.startswith('"') and value.endswith('"'), value
    return json.loads(value[1:-1].replace('\\"', '"'))


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[normalize(name)] = version
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def project_pins() -> dict[str, str]:
    """Every exact version the project pins: pyproject (all extras), constraints.txt, the Makefile's torch."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = constraints()
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    for spec in specs:
        if "==" in spec:
            name, _, version = spec.partition("==")
            pins[normalize(name)] = version.strip()
    torch = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    pins["torch"] = torch.group(1)
    return pins


# --- the Serve config, embedded in the RayService ---------------------------------------------------

def test_rayservice_embeds_the_serve_config_verbatim():
    embedded = rayservice()["spec"]["serveConfigV2"]
    assert embedded == SERVE_CONFIG.read_text()
    assert yaml.safe_load(embedded) == serve_config()


def test_every_rendered_file_is_current():
    assert render.outdated() == [], "run `python deploy/render.py`"
    assert render.main(["--check"]) == 0


def test_a_serve_config_change_shows_as_drift(tmp_path, monkeypatch):
    changed = tmp_path / "serve-config.yaml"
    changed.write_text(SERVE_CONFIG.read_text().replace("max_replicas: 8", "max_replicas: 6"))
    monkeypatch.setattr(render, "SERVE_CONFIG", changed)
    assert render.outdated() == [render.RAYSERVICE]
    assert render.main(["--check"]) == 1
    (rendered,) = [d for d in yaml.safe_load_all(render.render_rayservice()) if d and d["kind"] == "RayService"]
    assert yaml.safe_load(rendered["spec"]["serveConfigV2"]) == yaml.safe_load(changed.read_text())


def test_embed_block_replaces_only_the_block():
    doc = "a:\n  key: |\n    old\n    lines\n\n  other: 1\n"
    assert render.embed_block(doc, "key", "new: 1\n\n# c\n") == "a:\n  key: |\n    new: 1\n\n    # c\n\n  other: 1\n"
    with pytest.raises(ValueError):
        render.embed_block(doc, "missing", "x\n")


def test_embedded_serve_config_passes_rays_schema_and_imports():
    from ray.serve.schema import ServeDeploySchema

    from serving.config import FarmSettings

    schema = ServeDeploySchema.model_validate(yaml.safe_load(rayservice()["spec"]["serveConfigV2"]))
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    settings = FarmSettings.model_validate(app.args)
    # the farm's own idea of where it listens is where the proxies listen
    assert settings.host == schema.http_options.host == "0.0.0.0"
    assert schema.http_options.port == 8000
    assert settings.model.startswith("/models/") and settings.storage_url.startswith("s3://")
    assert Path(settings.job_db).is_absolute()
    assert any(w.min_replicas >= 1 for w in settings.workers.values())  # /readyz needs a running worker


# --- the RayService ------------------------------------------------------------------------------------

def test_rayservice_worker_groups_are_the_vram_classes():
    spec = rayservice()["spec"]["rayClusterConfig"]
    workers = app_args()["workers"]
    groups = spec["workerGroupSpecs"]
    by_class = {}
    for group in groups:
        resources = ray_start_resources(group["rayStartParams"]["resources"])
        vram = [k for k in resources if k.startswith("vram_")]
        assert len(vram) == 1, group["groupName"]  # one class per group
        by_class[vram[0][len("vram_"):]] = (group, resources[vram[0]])
    assert sorted(by_class) == sorted(workers)
    assert set(workers) <= set(default_classes().names)
    for name, (group, units) in by_class.items():
        (container,) = group["template"]["spec"]["containers"]
        gpus = int(group["rayStartParams"]["num-gpus"])
        assert gpus == units == container["resources"]["limits"]["nvidia.com/gpu"] >= 1, name
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert group["groupName"] == f"gpu-{name}"
        assert group["minReplicas"] == 0 and group["maxReplicas"] * gpus >= workers[name]["max_replicas"], name
        assert group["template"]["spec"]["nodeSelector"], name  # the operator says which nodes hold the class
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        assert container["image"].rsplit(":", 1)[0].endswith("/i2v-farm-gpu")


def test_rayservice_head_holds_the_job_store_and_no_gpu():
    service = rayservice()
    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    params = head["rayStartParams"]
    assert ray_start_resources(params["resources"]) == {HEAD_RESOURCE: 1}
    assert params["num-gpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert container["image"].rsplit(":", 1)[0].endswith("/i2v-farm-head")
    job_dir = str(Path(app_args()["job_db"]).parent)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == job_dir]
    (volume,) = [v for v in head["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert k8s_doc("rayservice.yaml", "PersistentVolumeClaim", claim)
    assert service["spec"]["upgradeStrategy"]["type"] == "None"  # never two job managers on one store
    assert cluster["rayVersion"] == constraints()["ray"]
    tags = {c["image"].rsplit(":", 1)[1] for g in [head, *cluster["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]}
    assert len(tags) == 1  # head and workers from one build


def test_rayservice_pods_share_settings_secret_and_volumes_with_the_other_manifests():
    cluster = rayservice()["spec"]["rayClusterConfig"]
    env = k8s_doc("rayservice.yaml", "ConfigMap", "i2v-farm-env")["data"]
    args = app_args()
    assert (env["I2V_MODEL"], env["I2V_STORAGE_URL"], env["I2V_JOB_DB"]) == (
        args["model"], args["storage_url"], args["job_db"])
    assert env["HF_HUB_OFFLINE"] == "1"

    minio_service = k8s_doc("minio.yaml", "Service", "minio")
    host, _, port = env["I2V_S3_ENDPOINT"].partition(":")
    assert host == minio_service["metadata"]["name"]
    assert int(port) in [p["port"] for p in minio_service["spec"]["ports"]]
    bucket_job = k8s_doc("minio.yaml", "Job", "minio-bucket")
    assert f"farm/{bucket_of(args['storage_url'])}" in bucket_job["spec"]["template"]["spec"]["containers"][0]["args"][0]

    minio = k8s_doc("minio.yaml", "Deployment", "minio")["spec"]["template"]["spec"]["containers"][0]
    secret = minio["envFrom"][0]["secretRef"]["name"]
    models_claim = k8s_doc("models.yaml", "PersistentVolumeClaim")["metadata"]["name"]
    download = k8s_doc("models.yaml", "Job")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert Path(args["model"]).parent == Path("/models") and args["model"] in download
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]
        assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "i2v-farm"
        (container,) = pod["spec"]["containers"]
        sources = container["envFrom"]
        assert {"configMapRef": {"name": "i2v-farm-env"}} in sources and {"secretRef": {"name": secret}} in sources
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
        if group is not cluster["headGroupSpec"]:
            assert claims == {models_claim}
    for name in ("rayservice.yaml", "minio.yaml", "models.yaml", "monitoring.yaml"):
        for doc in k8s_docs(name):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], name
            assert "namespace" not in doc["metadata"], name  # applied with -n


def test_kuberay_monitoring_selects_the_farms_pods_and_ports():
    cluster = rayservice()["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]}
    pods.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    monitors = [d for d in k8s_docs("monitoring.yaml") if d["kind"] == "PodMonitor"]
    jobs = {}
    for monitor in monitors:
        selector = dict(monitor["spec"]["selector"]["matchLabels"])
        node_type = selector.pop("ray.io/node-type", None)  # set by KubeRay on every Ray pod
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        matched = [name for name, pod in pods.items()
                   if selector.items() <= pod["metadata"]["labels"].items()
                   and node_type in (None, "head" if name == "head" else "worker")]
        assert matched, monitor["metadata"]["name"]
        for name in matched:
            ports = {p["name"] for p in pods[name]["spec"]["containers"][0]["ports"]}
            assert endpoint["port"] in ports, (monitor["metadata"]["name"], name)
        jobs[[r["replacement"] for r in endpoint["relabelings"] if r["targetLabel"] == "job"][0]] = matched
    # the job names the rules and dashboards use; the farm's metrics once per farm (from the head)
    local = yaml.safe_load((ROOT / "monitoring/prometheus/prometheus.yml").read_text())
    assert set(jobs) == {j["job_name"] for j in local["scrape_configs"]}
    assert jobs["i2v-farm"] == ["head"] and len(jobs["ray"]) == len(pods)

    rules = k8s_doc("monitoring.yaml", "PrometheusRule")["spec"]["groups"]
    expected = [g for p in sorted((ROOT / "monitoring/prometheus/rules").glob("*.yml")) for g in yaml.safe_load(p.read_text())["groups"]]
    assert rules == expected
    data = k8s_doc("monitoring.yaml", "ConfigMap")["data"]
    for path in (ROOT / "monitoring/grafana/dashboards").glob("*.json"):
        assert json.loads(data[path.name]) == json.loads(path.read_text())


# --- docker compose --------------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    values = {}
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


VAR = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?P<op>:?[-?])?(?P<arg>[^}]*)\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} against `env` (defaults when unset)."""
    def one(m):
        if m["name"] in env:
            return env[m["name"]]
        assert m["op"] and m["op"].endswith("-"), f"${{{m['name']}}} has no default and is not in .env.example"
        return m["arg"]
    return VAR.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """{target: (source, mode)} of a service's volumes, variables filled in from .env.example."""
    found = {}
    for mount in service.get("volumes", []):
        source, target, *mode = interpolate(mount, env_example()).split(":")
        found[target] = (source, mode[0] if mode else "rw")
    return found


def container_path(path: str) -> Path:
    """A path inside the images (the project is at /opt/i2v-farm) as a file of this checkout."""
    assert path.startswith("/opt/i2v-farm/"), path
    return ROOT / path[len("/opt/i2v-farm/"):]


def test_compose_references_only_files_and_variables_that_exist():
    config = compose()
    env = env_example()
    text = COMPOSE.read_text()
    used = {m["name"] for m in VAR.finditer(text)}
    assert set(env) - {"COMPOSE_PROFILES"} <= used, "variables in .env.example that compose.yaml never uses"
    for m in VAR.finditer(text):  # required variables are in .env.example
        if m["op"] == ":?":
            assert m["name"] in env, m["name"]
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", DOCKERFILE.read_text(), re.M))
    declared = set(config["volumes"])
    for name, service in config["services"].items():
        assert service.get("image"), name
        if "build" in service:
            build = service["build"]
            assert (COMPOSE_DIR / build["context"]).resolve() == ROOT, name
            assert (ROOT / build["dockerfile"]) == DOCKERFILE and build["target"] in stages, name
        for source, _ in mounts(service).values():
            if source.startswith((".", "/")):
                if source.startswith("."):  # a file of this checkout (absolute ones are host paths)
                    assert (COMPOSE_DIR / source).exists(), f"{name}: {source}"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
        for part in service.get("command") or []:
            if isinstance(part, str) and part.startswith("/opt/i2v-farm/"):
                assert container_path(part).is_file(), f"{name}: {part}"
    assert (COMPOSE_DIR / ".env.example").is_file()
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert "/compose/.env" in ignored and "/farm.env" in ignored  # secrets stay out of git


def test_compose_runs_the_same_application_and_settings():
    config = compose()
    args = app_args()
    services = config["services"]
    head = services["ray-head"]
    script = container_path(head["command"][-1])
    text = script.read_text()
    mounted = mounts(head)
    config_path = re.search(r'I2V_SERVE_CONFIG:-([^}]+)\}', text).group(1)
    assert mounted[config_path] == ("../serve-config.yaml", "ro")
    assert (COMPOSE_DIR / mounted[config_path][0]).resolve() == SERVE_CONFIG
    assert "serve deploy" in text and f'{{"{HEAD_RESOURCE}": 1}}' in text and "--num-gpus=0" in text
    assert mounted[str(Path(args["job_db"]).parent)] == ("farm-state", "rw")
    subprocess.run(["sh", "-n", str(script)], check=True)
    assert f"{serve_config()['http_options']['port']}" == head["ports"][0].rsplit(":", 1)[1].strip('"')

    for name, service in services.items():
        env = service.get("environment") or {}
        if "I2V_STORAGE_URL" in env:
            assert (env["I2V_MODEL"], env["I2V_STORAGE_URL"], env["I2V_JOB_DB"]) == (
                args["model"], args["storage_url"], args["job_db"]), name
            host, _, port = env["I2V_S3_ENDPOINT"].partition(":")
            assert host == "minio" and f"{port}" in str(services["minio"]["ports"][0])
    init = " ".join(services["minio-init"]["command"])
    assert f"mc mb --ignore-existing farm/{bucket_of(args['storage_url'])}" in init


def test_compose_has_one_gpu_worker_per_class():
    services = compose()["services"]
    for cls in default_classes():
        service = services[f"gpu-{cls.name}"]
        assert service["profiles"] == [cls.name]
        assert service["command"][-2:] == ["start", cls.name]
        assert service["environment"]["CUDA_VISIBLE_DEVICES"] == f"${{{gpu_worker.env_name(cls.name)}:-0}}"
        assert service["image"].startswith("i2v-farm-gpu:") and service["build"]["target"] == "gpu"
        mounted = mounts(service)
        assert mounted["/models"] == (env_example()["MODELS_DIR"], "ro")
        assert mounted["/var/cache/i2v-farm"][0] == f"spool-{cls.name}"  # the spool outlives the container
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert services["ray-head"]["image"].startswith("i2v-farm-head:") and "deploy" not in services["ray-head"]


def test_compose_monitoring_mounts_the_projects_config():
    services = compose()["services"]
    prometheus = mounts(services["prometheus"])
    assert prometheus["/etc/prometheus/prometheus.yml"] == ("./prometheus.yml", "ro")
    assert prometheus["/etc/prometheus/rules"] == ("../../monitoring/prometheus/rules", "ro")
    assert prometheus["/tmp/ray"] == ("ray-tmp", "ro") and mounts(services["ray-head"])["/tmp/ray"] == ("ray-tmp", "rw")
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    compose_prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    (farm_job,) = [j for j in compose_prom["scrape_configs"] if j["job_name"] == "i2v-farm"]
    assert farm_job["static_configs"][0]["targets"] == [f"ray-head:{serve_config()['http_options']['port']}"]

    grafana = mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == ("../../monitoring/grafana/provisioning", "ro")
    provider = yaml.safe_load((ROOT / "monitoring/grafana/provisioning/dashboards/i2v-farm.yml").read_text())
    assert grafana[provider["providers"][0]["options"]["path"]] == ("../../monitoring/grafana/dashboards", "ro")
    datasource = yaml.safe_load((ROOT / "monitoring/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090" and "prometheus" in services


def test_promtool_accepts_the_compose_prometheus_config(tmp_path):
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("'promtool' is not installed: run `make sysdeps` (Debian package prometheus)")
    # the container's layout: /etc/prometheus/prometheus.yml beside /etc/prometheus/rules/
    shutil.copy(COMPOSE_DIR / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copytree(ROOT / "monitoring/prometheus/rules", tmp_path / "rules")
    r = subprocess.run([path, "check", "config", str(tmp_path / "prometheus.yml")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr and "rules/i2v-farm.yml" in r.stdout + r.stderr


# --- the Dockerfile and the launcher: the project's pins ------------------------------------------

def dockerfile_stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """{stage: [(INSTRUCTION, arguments)]} with continuation lines joined and ARG defaults substituted."""
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append((buf + line).strip())
        buf = ""
    args, stages, current = {}, {}, "(global)"
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), rest)
        if instruction == "FROM":
            image, _, name = rest.partition(" AS ")
            current = name.strip() or image
            stages[current] = [("FROM", image.strip())]
        else:
            stages.setdefault(current, []).append((instruction, rest))
    return stages


def pip_installs(command: str) -> list[dict]:
    """Every `pip install` in a shell command line: its index, constraints, requirement files, specs."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set("&|;<>()"):  # an operator ends a simple command
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    found = []
    for words in commands:
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                opts = {"index": None, "constraints": [], "requirements": [], "no_deps": False, "specs": []}
                it = iter(words[i + 2:])
                for word in it:
                    if word in ("--index-url", "-i"):
                        opts["index"] = next(it)
                    elif word in ("-c", "--constraint"):
                        opts["constraints"].append(next(it))
                    elif word in ("-r", "--requirement"):
                        opts["requirements"].append(next(it))
                    elif word == "--no-deps":
                        opts["no_deps"] = True
                    elif not word.startswith("-"):
                        opts["specs"].append(word)
                found.append(opts)
    return found


def pin_problems(installs: list[dict], pins: dict[str, str]) -> list[str]:
    """What in these installs departs from the project's pins (empty: nothing)."""
    problems = []
    for opts in installs:
        packages = [s for s in opts["specs"] if not s.startswith((".", "/", "~"))]
        for spec in packages:
            name, sep, version = spec.partition("==")
            if not sep:
                problems.append(f"{spec}: not pinned with ==")
            elif pins.get(normalize(name)) != version:
                problems.append(f"{spec}: the project pins {normalize(name)}=={pins.get(normalize(name))}")
        resolves = not opts["no_deps"] and (opts["requirements"] or len(packages) < len(opts["specs"]))
        if resolves and "constraints.txt" not in opts["constraints"]:
            problems.append(f"{opts['specs'] or opts['requirements']}: installs dependencies without -c constraints.txt")
        if packages and {normalize(s.partition("==")[0]) for s in packages} - {"torch", "xformers"} and opts["index"]:
            problems.append(f"{packages}: only torch and xformers come from PyTorch's index")
    return problems


def test_dockerfile_installs_exactly_the_projects_pins():
    stages = dockerfile_stages(DOCKERFILE.read_text())
    pins = project_pins()
    assert {"base", "head", "gpu"} <= set(stages)
    for name in ("head", "gpu"):
        assert stages[name][0] == ("FROM", "base")
        installs = [i for op, rest in stages[name] if op == "RUN" for i in pip_installs(rest)]
        assert pin_problems(installs, pins) == [], name
        torch = [i for i in installs if any(s.startswith("torch==") for s in i["specs"])]
        assert len(torch) == 1 and installs.index(torch[0]) == 0, f"{name}: torch first, on its own index"
        project = [s for i in installs for s in i["specs"] if s.startswith(".")]
        assert project == (["."] if name == "head" else ['.[gpu]']), name
        assert any("/opt/requirements.txt" in i["requirements"] for i in installs)
        if name == "head":
            assert torch[0]["index"] == "https://download.pytorch.org/whl/cpu"
        else:
            assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", torch[0]["index"])
            assert f"xformers=={pins['xformers']}" in torch[0]["specs"]
    base = dict((op, rest) for op, rest in stages["base"] if op in ("FROM", "WORKDIR"))
    python = re.match(r"python:3\.(\d+)-", base["FROM"])
    assert python and 10 <= int(python.group(1)) <= 12  # requires-python >=3.10,<3.13
    assert base["WORKDIR"] == "/opt/i2v-farm"  # where compose's commands find the scripts
    requirements = [rest for op, rest in stages["base"] if op == "RUN" and "requirements.txt" in rest]
    assert requirements and "pyproject.toml" in requirements[0] and "['dependencies']" in requirements[0]
    for op, rest in (step for steps in stages.values() for step in steps):
        if op == "COPY":
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "deploy/farm.env", "deploy/compose/.env"} <= set(ignore)


def test_pin_check_is_not_vacuous():
    pins = project_pins()
    assert pin_problems(pip_installs("pip install --index-url X torch==2.0.0"), pins)
    assert pin_problems(pip_installs("pip install -r req.txt"), pins)
    assert pin_problems(pip_installs("pip install numpy"), pins)
    assert pin_problems(pip_installs("pip install --index-url X torch==%s numpy==%s" % (pins["torch"], pins["numpy"])), pins)
    assert not pin_problems(pip_installs("pip install --no-deps ."), pins)
    assert not pin_problems(pip_installs(f"cd x && python -m pip install -c constraints.txt -e '.[gpu]' pillow=={pins['pillow']}"), pins)


def test_ray_cluster_setup_installs_the_projects_pins():
    config = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    pins = project_pins()
    for key in ("head_setup_commands", "worker_setup_commands"):
        installs = [i for command in config[key] for i in pip_installs(command)]
        assert installs and pin_problems(installs, pins) == [], key
    assert config["docker"]["image"].startswith(f"rayproject/ray:{pins['ray']}-")
    assert config["docker"]["head_image"].startswith(f"rayproject/ray:{pins['ray']}-")
    assert "farm.env" in config["file_mounts"]["~/i2v-farm.env"]


# --- the compose GPU worker's entrypoint --------------------------------------------------------------

def gpu(index: int, gib: float, name: str = "GPU") -> LocalGpu:
    return LocalGpu(index=index, name=name, memory_bytes=int(gib * GiB))


def test_gpu_worker_joins_with_its_class_resource_per_gpu():
    classes = default_classes()
    argv, notes = gpu_worker.start_command("24gb", [gpu(0, 23.99), gpu(2, 22.49)], classes, "ray-head:6379")
    assert argv[:3] == ["ray", "start", "--address=ray-head:6379"]
    assert "--num-gpus=2" in argv and '--resources={"vram_24gb": 2}' in argv and "--block" in argv
    assert notes == []
    _, notes = gpu_worker.start_command("24gb", [gpu(1, 79.6, "H100")], classes, "h:1")
    assert notes and "could serve class 80gb" in notes[0]
    with pytest.raises(ValueError, match="too small for class 40gb"):
        gpu_worker.start_command("40gb", [gpu(0, 23.99)], classes, "h:1")
    with pytest.raises(ValueError, match="GPUS_12GB"):
        gpu_worker.start_command("12gb", [], classes, "h:1")


def test_gpu_worker_main_execs_ray_or_explains(capsys):
    calls = []
    assert gpu_worker.main(["start", "12gb"], detect=lambda: [gpu(0, 12)], execvp=lambda f, a: calls.append(a)) == 0
    assert calls and calls[0][0] == "ray"
    assert gpu_worker.main(["start", "16gb"], detect=lambda: [gpu(0, 16)], execvp=calls.append) == 2
    assert "unknown VRAM class" in capsys.readouterr().err


def test_gpu_plan_prints_the_env_and_serve_config_lines():
    text = gpu_worker.plan([gpu(0, 23.99, "RTX 4090"), gpu(1, 11.7, "RTX 3060"), gpu(2, 23.99, "RTX 4090"),
                            gpu(3, 7.8, "RTX 2070")], default_classes())
    assert "COMPOSE_PROFILES=12gb,24gb" in text
    assert "GPUS_12GB=1" in text and "GPUS_24GB=0,2" in text
    assert "12gb: {min_replicas: 1, max_replicas: 1}" in text and "24gb: {min_replicas: 2, max_replicas: 2}" in text
    assert "RTX 2070" in text and "not used" in text
    workers = yaml.safe_load(textwrap.dedent(text.split("\n  workers:\n", 1)[1]))
    assert workers == {"12gb": {"min_replicas": 1, "max_replicas": 1}, "24gb": {"min_replicas": 2, "max_replicas": 2}}


# --- the operator's guide -------------------------------------------------------------------------------

def test_deploy_readme_names_only_files_that_exist():
    text = (DEPLOY / "README.md").read_text()
    paths = set(re.findall(r"(?<![\w/.~-])((?:deploy|monitoring|serving|cluster|tests)/[\w./-]*\w)", text))
    assert len(paths) > 10
    user_made = {"deploy/compose/.env", "deploy/farm.env"}
    missing = [p for p in paths if not (ROOT / p).exists() and p not in user_made]
    assert missing == []


# --- Ray's token auth, secrets and exposure (docs/security.md) -------------------------------------

SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN)$")


def test_compose_ships_no_fixed_secret_and_requires_each():
    env = env_example()
    secrets = [k for k in env if SECRET_NAME.search(k)]
    assert {"MINIO_ROOT_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "RAY_AUTH_TOKEN"} <= set(secrets)
    assert {k: env[k] for k in secrets if env[k]} == {}  # empty in the example: gen-env.sh or the operator
    text = COMPOSE.read_text()
    for m in VAR.finditer(text):
        if SECRET_NAME.search(m["name"]):
            assert m["op"] == ":?", f"${{{m['name']}}} must be required (:?), never defaulted"
    # every value a secret setting gets in compose.yaml is a required variable, never a literal
    for name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key) or key.endswith("_SECRET_KEY"):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", str(value)), (name, key, value)


def test_compose_publishes_on_loopback_unless_the_operator_opts_in():
    env = env_example()
    assert env["I2V_PUBLISH_ADDR"] == "127.0.0.1"
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith(("${I2V_PUBLISH_ADDR:-127.0.0.1}:", "127.0.0.1:")), (name, port)
            assert interpolate(port, {}).startswith("127.0.0.1:"), (name, port)  # .env without the setting
    head_ports = [interpolate(p, env) for p in compose()["services"]["ray-head"]["ports"]]
    assert any(p.endswith(":8265") and p.startswith("127.0.0.1:") for p in head_ports)  # dashboard: never opted in


def test_compose_runs_every_ray_container_with_token_auth():
    services = compose()["services"]
    ray_services = [n for n, s in services.items() if "I2V_STORAGE_URL" in (s.get("environment") or {})]
    assert {"ray-head", "gpu-12gb", "gpu-24gb", "gpu-40gb", "gpu-80gb"} <= set(ray_services)
    for name in ray_services:
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name


def test_gen_env_makes_a_private_env_with_random_secrets_and_never_overwrites(tmp_path):
    out = tmp_path / ".env"
    script = COMPOSE_DIR / "gen-env.sh"
    run = subprocess.run(["sh", str(script), str(out)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    made = dict(line.split("=", 1) for line in out.read_text().splitlines() if line and not line.startswith("#"))
    example = env_example()
    assert set(made) == set(example)
    for key, value in made.items():
        if SECRET_NAME.search(key):
            assert re.fullmatch(r"[0-9a-f]{64}", value), key
            assert value not in run.stdout + run.stderr
        else:
            assert value == example[key], key
    second = tmp_path / ".env2"
    subprocess.run(["sh", str(script), str(second)], check=True, capture_output=True, timeout=30)
    assert made["RAY_AUTH_TOKEN"] not in second.read_text()  # random each time
    before = out.read_text()
    again = subprocess.run(["sh", str(script), str(out)], capture_output=True, text=True, timeout=30)
    assert again.returncode != 0 and out.read_text() == before


def ray_containers(cluster: dict):
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        yield from group["template"]["spec"]["containers"]


def test_rayservice_runs_ray_with_token_auth_from_a_secret():
    cluster = rayservice()["spec"]["rayClusterConfig"]
    secret = cluster["authOptions"]["secretName"]
    assert cluster["authOptions"]["mode"] == "token"
    for container in ray_containers(cluster):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": secret, "key": "auth_token"}}
    # the Secret is the operator's (created with a random token), never a manifest with a value
    for name in ("rayservice.yaml", "minio.yaml", "models.yaml", "monitoring.yaml"):
        assert not [d for d in k8s_docs(name) if d["kind"] == "Secret"], name
    assert f"kubectl create secret generic {secret} --from-literal=auth_token=$(openssl rand" in (
        KUBERAY / "rayservice.yaml").read_text()


def _policy_allows(policy: dict, source: dict[str, str], port: int) -> bool:
    """Whether a NetworkPolicy lets a pod with labels `source` (any namespace) reach `port`."""
    for rule in policy["spec"]["ingress"]:
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        peers = rule.get("from")
        if not peers:
            return True
        for peer in peers:
            wanted = peer.get("podSelector", {}).get("matchLabels", {})
            if wanted.items() <= source.items():
                return True
    return False


def test_networkpolicy_lets_only_the_farms_pods_reach_rays_ports():
    policy = k8s_doc("rayservice.yaml", "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    cluster = rayservice()["spec"]["rayClusterConfig"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    farm_pods = [g["template"]["metadata"]["labels"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]
    assert all(selector.items() <= labels.items() for labels in farm_pods)  # it covers every Ray pod
    ray_ports = [6379, 8265, 10001, 52365, 8080, 8076, 45678]  # GCS, dashboard, client, agent, metrics, OM, a worker
    stranger, operator, prometheus = {}, {"app.kubernetes.io/name": "kuberay-operator"}, {
        "app.kubernetes.io/name": "prometheus"}
    for port in ray_ports:
        assert not _policy_allows(policy, stranger, port), port
        assert _policy_allows(policy, farm_pods[0], port) and _policy_allows(policy, farm_pods[-1], port), port
    assert _policy_allows(policy, stranger, 8000)  # the API and web page
    assert [p for p in ray_ports if _policy_allows(policy, operator, p)] == [8265, 52365]
    assert [p for p in ray_ports if _policy_allows(policy, prometheus, p)] == [8080]
    assert not _policy_allows(policy, {"app.kubernetes.io/name": "minio"}, 6379)


def test_serve_service_exposes_only_the_http_port():
    service = rayservice()["spec"]["serveService"]
    assert service["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in service["spec"]["ports"]] == [serve_config()["http_options"]["port"]] == [8000]
