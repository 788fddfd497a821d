"""training.step_log.StepLog: the one step log of every trainer (metrics.jsonl, console line, progress bar)."""
import json

from training.metrics import read_metrics
from training.step_log import StepLog, format_record


def test_records_lines_and_a_resume_that_redoes_the_steps_after_its_checkpoint(tmp_path, capsys):
    log = StepLog(tmp_path, total_steps=6, start_step=0, desc="t")
    for step in range(1, 5):
        log.advance()
        log.write({"step": step, "loss": 1.0 / step}, line=f"step {step}/6 | loss {1.0 / step:.3f}" if step == 4 else None)
    log.close()
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["step 1  loss 1", "step 2  loss 0.5", "step 3  loss 0.3333", "step 4/6 | loss 0.250"]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    resumed = StepLog(tmp_path, total_steps=6, start_step=2)  # the checkpoint was at step 2: 3 and 4 are redone
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    resumed.write({"step": 3, "loss": 0.25}, echo=False)
    resumed.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert capsys.readouterr().out == ""


def test_a_fresh_run_starts_the_log_over_and_other_ranks_write_nothing(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 9, "loss": 3.0}) + "\n")
    StepLog(tmp_path, total_steps=3, start_step=0).close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []
    other = StepLog(tmp_path, total_steps=3, enabled=False)
    other.write({"step": 1, "loss": 2.0})
    other.print("not shown")
    other.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [] and capsys.readouterr().out == ""


def test_format_record():
    assert format_record({"step": 3, "loss": 0.123456, "name": "x"}) == "step 3  loss 0.1235  name x"
