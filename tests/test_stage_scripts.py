"""Multi-stage scripts (quick start, VQA, synthesis, diffusion) stop at the stage that was stopped, say so, and
end with its status (scripts/stages.sh)."""
import os
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A stand-in trainer: saves and exits 143 on SIGTERM (130 on SIGINT) like ours, after printing that it started.
TRAINER = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
           "signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\n"
           "print('started', flush=True)\n"
           "time.sleep(60)\n")


def script(tmp_path, second_stage="echo second stage ran"):
    path = tmp_path / "two_stages.sh"
    path.write_text(f"""set -euo pipefail
cd {ROOT}
source scripts/stages.sh
run_stage "stage one" python3 -c "$TRAINER"
run_stage "stage two" {second_stage}
echo all done
""")
    return path


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_stage_ends_the_script_with_its_status_and_says_so(tmp_path, sig, code):
    proc = subprocess.Popen(["bash", str(script(tmp_path))], env={**os.environ, "TRAINER": TRAINER},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(0.2)
    os.killpg(proc.pid, sig)  # the whole group, as Slurm / systemd / Ctrl-C do
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, (out, err)
    assert "second stage ran" not in out and "all done" not in out
    assert f"[two_stages] stage one was stopped (exit {code}) after saving; the stages after it were not run" in err


def test_a_failed_stage_ends_the_script_naming_it(tmp_path):
    path = script(tmp_path, second_stage="python3 -c 'import sys; sys.exit(3)'")
    path.write_text(path.read_text().replace('run_stage "stage one" python3 -c "$TRAINER"', ""))
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "stage two failed (exit 3)" in proc.stderr and "all done" not in proc.stdout


def test_vqa_script_refuses_a_missing_config_in_one_line(tmp_path):
    proc = subprocess.run(["bash", "scripts/train_vqa.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CONFIG": "missing", "OUT": str(tmp_path / "out")})
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "CONFIG=configs/missing.json: no such file" in proc.stderr and "vqa_tiny_cpu" in proc.stderr


def test_a_signal_to_the_script_alone_starts_no_later_stage(tmp_path):
    """kill PID of the script only (some CI runners and supervisors do that): the running stage finishes (it did
    not get the signal), nothing after it starts, and the script ends with 143 saying so."""
    path = tmp_path / "two_stages.sh"
    path.write_text(f"""set -euo pipefail
cd {ROOT}
source scripts/stages.sh
run_stage "stage one" python3 -c "import time; print('started', flush=True); time.sleep(2)"
run_stage "stage two" echo second stage ran
""")
    proc = subprocess.Popen(["bash", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)  # to bash only
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (out, err)
    assert "second stage ran" not in out
    assert "a stop signal arrived while stage one ran; it finished, the stages after it were not run" in err
