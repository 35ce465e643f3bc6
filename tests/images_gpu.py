"""The GPU image, built and inspected where there is no GPU: `make test-images`.

Not in `make test`: its CUDA wheels are about 1.5 GB (2.9 GB unpacked) and the build takes 3 to 4
minutes on 2 cores. What a machine without a GPU can check, it checks: the build itself (which fails
when the CUDA provider cannot find a library, deploy/check_image.py), then in the built image that
the dynamic loader finds every library the provider links to but the driver's own (which the NVIDIA
container toolkit mounts at run time), that onnxruntime-gpu is the only ONNX Runtime, and that the
service starts on the CPU saying loudly, in its log and in GET /models, that it has no GPU.
"""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import png_bytes, run_cli, wait_until
from tests.test_images import container, engine_or_skip, engine_run, logs, serving

pytestmark = pytest.mark.processes
GPU_IMAGE = "classic-cnns:gpu"
PROVIDER = "/app/.venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so"


@pytest.fixture(scope="module")
def engine() -> str:
    return engine_or_skip()


@pytest.fixture(scope="module")
def gpu_image(engine, bentoml_home) -> str:
    env = {"BENTOML_HOME": str(bentoml_home), "SERVING_MODELS": "fashion-lenet:latest", "ENGINE": engine}
    result = run_cli("-m", "deploy.image", "--gpu", "--tag", GPU_IMAGE, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return GPU_IMAGE


def test_the_cuda_provider_finds_every_library_but_the_drivers(engine, gpu_image):
    ldd = engine_run(engine, "run", "--rm", "--entrypoint", "ldd", gpu_image, PROVIDER).stdout
    missing = [line.split()[0] for line in ldd.splitlines() if "not found" in line]
    assert missing == ["libcuda.so.1"], ldd  # the driver's: mounted from the host at run time
    assert "libcublasLt.so.13 => /app/.venv" in ldd and "libcudart.so.13 => /app/.venv" in ldd
    probe = (
        "import ctypes, importlib.metadata as m, onnxruntime as o; "
        "ctypes.CDLL('libcudnn.so.9'); "  # loaded by the provider when a session starts
        "names = {d.metadata['Name'].lower() for d in m.distributions()}; "
        "print(sorted(n for n in names if n.startswith(('onnxruntime', 'torch'))), "
        "'CUDAExecutionProvider' in o.get_available_providers())"
    )
    out = engine_run(engine, "run", "--rm", "--entrypoint", "python3", gpu_image, "-c", probe).stdout.strip()
    assert out == "['onnxruntime-gpu'] True"


def test_without_a_gpu_it_serves_on_the_cpu_and_says_so(engine, gpu_image, fashion_test):
    images, _ = fashion_test
    with container(engine, gpu_image) as (cid, url):
        wait_until(lambda: serving(engine, cid, url), lambda: f"{url} ready:\n{logs(engine, cid)}", 180, 0.2)
        model = httpx.get(f"{url}/models", timeout=60).json()["models"][0]
        assert model["provider"] == "CPUExecutionProvider"
        assert "a GPU was requested (device='cuda')" in model["provider_error"]
        log = engine_run(engine, "logs", cid).stderr + engine_run(engine, "logs", cid).stdout
        assert "[ERROR]" in log and "a GPU was requested (device='cuda')" in log
        files = {"image": ("x.png", png_bytes(images[0]), "image/png")}
        assert httpx.post(f"{url}/classify", files=files, timeout=60).status_code == 200
