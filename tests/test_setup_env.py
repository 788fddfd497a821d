"""scripts/setup_env.sh picks torch's wheel index: the CPU index on a machine without an NVIDIA driver when it can be
reached, pip's default otherwise, TORCH_INDEX overriding; one "[setup] torch:" line says which
(`--which-torch` prints it without touching any environment)."""
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "setup_env.sh"
CPU_DEFAULT = "https://download.pytorch.org/whl/cpu"
NO_VENV = "/dev/null/venv"

machine_has_driver = shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia")
needs_no_driver = pytest.mark.skipif(machine_has_driver, reason="this machine has an NVIDIA driver")


def which_torch(tmp_path, nvidia_smi=None, **env):
    """The script's choice, with an optional fake nvidia-smi ('ok' or 'fails') first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi:
        fake = bin_dir / "nvidia-smi"
        fake.write_text("#!/bin/sh\nexit %d\n" % (0 if nvidia_smi == "ok" else 9))
        fake.chmod(0o755)
    environment = {k: v for k, v in os.environ.items()  # no proxy between the probe and the local stand-in
                   if k not in ("TORCH_INDEX", "TORCH_CPU_INDEX") and "proxy" not in k.lower()}
    # VENV cannot be created: a script that ignored --which-torch would fail at once instead of installing
    environment.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable, VENV=NO_VENV, **env)
    result = subprocess.run(["bash", str(SCRIPT), "--which-torch"], env=environment, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[setup] torch: "), result.stdout
    return lines[0]


@pytest.fixture
def cpu_index(tmp_path):
    """A reachable stand-in for the CPU wheel index (a local HTTP server with a torch/ page)."""
    root = tmp_path / "index"
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "index.html").write_text("<html></html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def closed_port_url():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/whl/cpu"


@needs_no_driver
def test_no_driver_and_a_reachable_cpu_index_take_the_cpu_build(tmp_path, cpu_index):
    line = which_torch(tmp_path, TORCH_CPU_INDEX=cpu_index)
    assert line.startswith(f"[setup] torch: no NVIDIA driver: the CPU build from {cpu_index} ")
    assert "TORCH_INDEX=default" in line


@needs_no_driver
def test_a_failing_nvidia_smi_counts_as_no_driver(tmp_path, cpu_index):
    assert "the CPU build" in which_torch(tmp_path, nvidia_smi="fails", TORCH_CPU_INDEX=cpu_index)


@needs_no_driver
def test_an_unreachable_cpu_index_falls_back_to_pips_default_in_one_line(tmp_path):
    url = closed_port_url()
    line = which_torch(tmp_path, TORCH_CPU_INDEX=url)
    assert f"no NVIDIA driver, but {url} cannot be reached within 5 s" in line
    assert "pip's default index" in line and "TORCH_INDEX=URL" in line


def test_an_nvidia_driver_keeps_pips_default_cuda_build(tmp_path, cpu_index):
    line = which_torch(tmp_path, nvidia_smi="ok", TORCH_CPU_INDEX=cpu_index)
    assert line.startswith("[setup] torch: NVIDIA driver found: pip's default index, the CUDA build")
    assert cpu_index in line  # the override that would give the CPU build


@pytest.mark.parametrize("nvidia_smi", [None, "ok"])
def test_torch_index_overrides_the_choice(tmp_path, cpu_index, nvidia_smi):
    assert which_torch(tmp_path, nvidia_smi, TORCH_INDEX="default", TORCH_CPU_INDEX=cpu_index) == \
        "[setup] torch: pip's default index (TORCH_INDEX=default)"
    chosen = which_torch(tmp_path, nvidia_smi, TORCH_INDEX=CPU_DEFAULT)
    assert chosen == f"[setup] torch: from {CPU_DEFAULT} (TORCH_INDEX)"


def test_unknown_argument_is_refused(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "--cpu"], env={**os.environ, "VENV": NO_VENV}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "got '--cpu'" in result.stderr and "--which-torch" in result.stderr
