"""`bentoml build`, offline, for both flavours: what goes into the deployable image."""

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.config import ENV, ServingConfig
from tests.conftest import run_cli


@pytest.mark.parametrize(
    "bentofile, runtime, device",
    [
        ("bentofile.yaml", "onnxruntime==1.31.1", "cpu"),
        # CUDA from onnxruntime-gpu's own extras: the CUDA major it was built for, whatever that is
        ("bentofile.gpu.yaml", "onnxruntime-gpu[cuda,cudnn]==1.31.1", "cuda"),
    ],
)
def test_bento_is_torch_free_and_packages_every_served_model(bentoml_home, served_models, bentofile, runtime, device):
    result = run_cli(
        "-m",
        "bentoml",
        "build",
        "-f",
        bentofile,
        ".",
        "--output",
        "tag",
        env={"BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True", "SERVING_MODELS": served_models},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = bentoml_home / "bentos" / name / version

    requirements = (bento / "env/python/requirements.txt").read_text().splitlines()
    assert runtime in requirements and "fastapi>=0.110" in requirements
    assert not [r for r in requirements if r.startswith(("torch", "onnxruntime")) and r != runtime]  # no torch, one ORT
    assert {"uvloop>=0.19", "httptools>=0.6"} <= set(requirements)  # uvicorn's C loop and parser, as installed locally
    # No CUDA base image to disagree with the CUDA of onnxruntime-gpu's wheels (BentoML's newest,
    # 12.8.1, is older than the CUDA 13 that onnxruntime-gpu 1.31.1 needs): deploy/image.py builds
    # every image on one Python base.
    assert "cuda_version" not in (yaml.safe_load(open(bentofile)).get("docker") or {})

    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert {m["tag"].split(":")[0] for m in info["services"][0]["models"]} == {"fashion-lenet", "test-lenet"}
    assert {"name": "SERVING_DEVICE", "value": device, "stage": "all"} in info["envs"]
    assert {"name": "SERVING_MODEL_CONTROL", "value": "false", "stage": "all"} in info["envs"]
    assert {r["route"] for r in info["schema"]["routes"]} == {"/classify", "/classify_batch", "/explain"}
    sources = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*.py")}
    assert "serving/service.py" in sources and "model_store/preprocess.py" in sources
    assert (bento / "src/serving/ui.html").is_file()  # GET /ui reads it at start
    assert not [s for s in sources if s.startswith(("training/", "export/", "tests/"))]


def test_kubernetes_manifest_probes_and_scales_on_what_the_service_exposes(server, server_grpc_port):
    deployment, _, autoscaler = yaml.safe_load_all(open("deploy/kubernetes.yaml"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert httpx.get(f"{server}{container['livenessProbe']['httpGet']['path']}", timeout=60).status_code == 200
    # readiness: gRPC's health service, on the port the manifest names grpc (the test server's own port here)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["grpc"] == {"port": ports["grpc"]} and ports["grpc"] == 8001
    with grpc.insecure_channel(f"127.0.0.1:{server_grpc_port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    metric = autoscaler["spec"]["metrics"][0]["pods"]["metric"]["name"]
    exposed = {
        line.split("{")[0].split(" ")[0] for line in httpx.get(f"{server}/metrics", timeout=60).text.splitlines()
    }
    assert metric in exposed, metric
    assert {e["name"] for e in container["env"]} <= set(ENV.values())  # every variable it sets exists
    # Its memory limit holds the README's bound for the settings it gives.
    config = ServingConfig.from_env({e["name"]: e["value"] for e in container["env"] if "value" in e})
    limit_mb = int(container["resources"]["limits"]["memory"].removesuffix("Gi")) * 1024
    assert config.memory_bound_mb <= limit_mb and "SERVING_DECODE_WORKERS" in {e["name"] for e in container["env"]}
