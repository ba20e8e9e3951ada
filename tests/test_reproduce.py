"""`metavae reproduce`: the queue a table needs, skipping finished runs, resuming after an interrupt."""
import json
import signal
import sys

import pytest

from metavae.cli import main
from metavae.paper import reproduce as R


def _finish(task, **config):
    task.out.mkdir(parents=True, exist_ok=True)
    (task.out / "metrics.json").write_text(json.dumps({"mean_unseen_accuracy": {}, "config": dict(task.settings, **config)}))


def test_dry_run_lists_the_table_queue(tmp_path, capsys):
    tasks = R.plan("mnist-table2", tmp_path, "long", seeds=(0, 1))
    names = [t.name for t in tasks]
    assert len(tasks) == 3 * (4 * 2 + 2)  # 3 axes x (4 models x 2 seeds + 2 controls, which no seed changes)
    assert names[0] == "mnist-rotate contiguous metavae seed 0" and "mnist-shear contiguous ns seed 1" in names
    assert sum("pixels" in n for n in names) == 3
    assert tasks[0].out == tmp_path / "mnist-rotate" / "contiguous" / "metavae" / "seed-0"
    assert tasks[0].argv[3:] == ["run", "mnist-rotate", "--split", "contiguous", "--model", "metavae", "--seed", "0",
                                 "--out", str(tasks[0].out), "--quiet", "--preset", "long"]
    _finish(tasks[0])
    assert main(["reproduce", "mnist-table2", "--preset", "long", "--seeds", "0,1", "--runs", str(tmp_path),
                 "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(tasks) + 1
    assert "[done]" in lines[0] and all("[to do]" in line for line in lines[1:-1])
    assert lines[-1].startswith(f"{len(tasks) - 1} of {len(tasks)} run(s) to do")
    assert all(("min" in line or " h " in line or "unknown" in line) for line in lines[:-1])


def test_estimates_come_from_the_same_run_else_the_same_model_on_other_axes():
    tasks = {t.name: t for t in R.plan("mnist-table2", "runs", "long")}
    rotate, shear = tasks["mnist-rotate contiguous ns seed 0"], tasks["mnist-shear contiguous ns seed 0"]
    committed = [(rotate.key, dict(rotate.settings), 3600.0, True),
                 (("mnist-rotate", "contiguous", "ns"), dict(rotate.settings, epochs=99), 1.0, True),  # other settings
                 (("mnist-scale", "contiguous", "vhe"), dict(rotate.settings), 60.0, False)]
    assert R.estimate(rotate, committed) == (3600.0, True, False)
    assert R.estimate(shear, committed) == (3600.0, True, True)  # the NS on rotate stands in for shear
    assert R.estimate(tasks["mnist-shear contiguous metavae seed 0"], committed) is None
    assert R.estimate(R.plan("norb-table2", "runs")[3], committed) is None  # another family never stands in
    # beside runs that record their evaluation (the newer code's), older runs that do not are left out
    older = committed + [(rotate.key, dict(rotate.settings), 9000.0, False)]
    assert R.estimate(rotate, older) == (3600.0, True, False)
    assert R.estimate(rotate, [(rotate.key, dict(rotate.settings), 9000.0, False)]) == (9000.0, False, False)


def test_a_setting_a_run_predates_is_taken_at_its_default():
    """A run made before `amp` existed trained in fp32 (amp's default): it is a finished fp32 run and
    an estimate for fp32 runs, never for a bf16 queue."""
    fp32 = R.plan("mnist-table1", "runs", "long")[0]
    bf16 = R.plan("mnist-table1", "runs", "long", overrides={"amp": "bf16"})[0]
    old = {k: v for k, v in fp32.settings.items() if k != "amp"}
    assert fp32.defaults["amp"] is None and bf16.settings["amp"] == "bf16"
    assert R.matches(old, fp32.settings, fp32.defaults) and not R.matches(old, bf16.settings, bf16.defaults)
    committed = [(fp32.key, old, 600.0, True)]
    assert R.estimate(fp32, committed) == (600.0, True, False) and R.estimate(bf16, committed) is None


def test_table1_is_the_interleaved_metavae_and_bad_input_is_refused(tmp_path, capsys):
    assert [t.name for t in R.plan("norb-table1", tmp_path, seeds=(3,))] == [
        f"norb-{a} interleaved metavae seed 3" for a in ("elevation", "azimuth", "lighting")]
    assert main(["reproduce", "mnist-table1", "--seeds", "x", "--dry-run", "--runs", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["reproduce", "mnist-table1", "--preset", "nope", "--dry-run", "--runs", str(tmp_path)]) == 2


def test_a_finished_run_of_other_settings_is_refused(tmp_path):
    task = R.plan("mnist-table1", tmp_path)[0]
    _finish(task)
    assert R.finished(task)
    _finish(task, epochs=task.settings["epochs"] + 1)
    with pytest.raises(ValueError, match="other settings"):
        R.finished(task)


def test_a_finished_run_on_fewer_seen_values_counts_as_finished_in_either_record(tmp_path):
    """A run with seen=K trains with batch size and epochs scaled by 10 / K; its metrics.json records
    the config it was asked for (older runs recorded the scaled one): a resumed queue takes both as
    its own and still refuses a run asked for with other epochs."""
    task = R.plan("mnist-table2", tmp_path, "long", overrides={"seen": 2})[0]
    epochs, batch = task.settings["epochs"], task.settings["batch_size"]
    record = {"mean_unseen_accuracy": {}, "split_seen": list(range(10)), "trained_with": {"epochs": 5 * epochs}}
    task.out.mkdir(parents=True)
    for m in (dict(record, config=dict(task.settings)),  # as runs record it now
              {"mean_unseen_accuracy": {}, "split_seen": list(range(10)),  # as they did before
               "config": dict(task.settings, epochs=5 * epochs, batch_size=5 * batch)}):
        (task.out / "metrics.json").write_text(json.dumps(m))
        assert R.finished(task)
    (task.out / "metrics.json").write_text(json.dumps(dict(record, config=dict(task.settings, epochs=epochs + 1))))
    with pytest.raises(ValueError, match="other settings"):
        R.finished(task)


def _fake(tmp_path, name, seconds=0.0, fail=False):
    """A task whose command counts its launches, sleeps, then writes a finished metrics.json (or fails)."""
    out = tmp_path / name
    code = (f"import json, pathlib, time; out = pathlib.Path({str(out)!r}); "
            f"(out / 'launches').write_text(str(int((out / 'launches').read_text() or 0) + 1) "
            f"if (out / 'launches').exists() else '1'); time.sleep({seconds}); "
            + ("raise SystemExit(3)" if fail else
               "(out / 'metrics.json').write_text(json.dumps({'mean_unseen_accuracy': {}, 'config': {}}))"))
    return R.Task(name, out, [sys.executable, "-c", code])


def _launches(task):
    return int((task.out / "launches").read_text()) if (task.out / "launches").exists() else 0


def test_queue_runs_skips_finished_and_reports_failures(tmp_path):
    tasks = [_fake(tmp_path, f"t{i}") for i in range(3)] + [_fake(tmp_path, "bad", fail=True)]
    assert R.run_queue(tasks, jobs=2, progress=False, poll=0.05) == ["bad"]
    assert [_launches(t) for t in tasks] == [1, 1, 1, 1]
    assert R.run_queue(tasks, jobs=2, progress=False, poll=0.05) == ["bad"]  # only the unfinished run again
    assert [_launches(t) for t in tasks] == [1, 1, 1, 2]


def test_an_interrupted_queue_resumes_where_it_stopped(tmp_path):
    tasks = [_fake(tmp_path, "quick"), _fake(tmp_path, "slow", seconds=60), _fake(tmp_path, "later")]

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            R.run_queue(tasks, jobs=1, progress=False, poll=0.05)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert [R.finished(t) for t in tasks] == [True, False, False]
    assert [_launches(t) for t in tasks] == [1, 1, 0]  # the slow run was stopped, the last never started
    tasks[1] = _fake(tmp_path, "slow")  # its rerun now finishes quickly
    assert R.run_queue(tasks, jobs=1, progress=False, poll=0.05) == []
    assert [_launches(t) for t in tasks] == [1, 2, 1]


def test_every_launch_adds_its_wall_time_and_each_runs_to_the_ledger(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    tasks = [_fake(runs, "a", seconds=0.3), _fake(runs, "bad", fail=True)]
    monkeypatch.setattr(R, "plan", lambda *a, **k: tasks)

    def report(folder, out):
        (folder / "mnist-report").mkdir(parents=True, exist_ok=True)
        (folder / "mnist-report" / "report.md").write_text("report\n")

    monkeypatch.setattr(R, "get_report", lambda family: report)
    ledger = runs / "reproduce-mnist-table2.json"
    for launch in (1, 2):
        with pytest.raises(ValueError, match="1 run\\(s\\) failed"):
            R.reproduce("mnist-table2", runs, progress=False)
        data = json.loads(ledger.read_text())
        assert len(data["launches"]) == launch
        assert data["runs"]["a"] == {"wall_seconds": data["launches"][0]["runs"]["a"], "launches": 1, "finished": True}
        assert data["runs"]["a"]["wall_seconds"] >= 0.3 and data["runs"]["bad"]["launches"] == launch
        assert not data["runs"]["bad"]["finished"]
        assert data["wall_seconds"] == pytest.approx(sum(x["seconds"] for x in data["launches"]), abs=0.11)
    assert "over 2 launches" in capsys.readouterr().err
    ledger.write_text("{not json")  # a damaged ledger is set aside, never fatal
    with pytest.raises(ValueError, match="failed"):
        R.reproduce("mnist-table2", runs, progress=False)
    assert "unreadable" in capsys.readouterr().err and (runs / "reproduce-mnist-table2.json.unreadable").exists()
    assert len(json.loads(ledger.read_text())["launches"]) == 1


def test_a_launch_stopped_by_sigterm_keeps_its_time_and_the_running_runs(tmp_path, monkeypatch):
    """SIGTERM (a scheduler, a session's end) stops the queue like Ctrl-C: the running child is
    stopped and resumes next time, and the launch is in the ledger; progress reaches the ledger
    while runs are still going."""
    import os
    import threading

    runs = tmp_path / "runs"
    tasks = [_fake(runs, "slow", seconds=60)]
    monkeypatch.setattr(R, "plan", lambda *a, **k: tasks)
    seen = []
    queue = R.run_queue
    monkeypatch.setattr(R, "run_queue", lambda *a, **k: queue(*a, **dict(k, every=0.2, poll=0.05)))
    update = R.Ledger.update
    monkeypatch.setattr(R.Ledger, "update", lambda self, *a: (seen.append(dict(a[1])), update(self, *a))[1])
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        R.reproduce("mnist-table2", runs, progress=False)
    timer.join()
    assert any(s.get("slow", 0) > 0 for s in seen[:-1])  # written while the run was still going
    data = json.loads((runs / "reproduce-mnist-table2.json").read_text())
    assert data["runs"]["slow"]["wall_seconds"] >= 1.0 and data["runs"]["slow"]["finished"] is False
    assert data["launches"][0]["seconds"] >= 1.4 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_reproduce_runs_a_tiny_table_then_reports(tmp_path, shared_mnist, capsys, monkeypatch):
    """One real run of the queue (the others' absence is the report's "missing runs"), for speed."""
    monkeypatch.setenv("METAVAE_DATA", str(tmp_path / "cache"))
    plan = R.plan
    monkeypatch.setattr(R, "plan", lambda *a, **k: plan(*a, **k)[:1])
    argv = ["reproduce", "mnist-table1", "--runs", str(tmp_path / "runs"), "--data-dir", str(shared_mnist),
            "--jobs", "2", "--quiet", "--set", "train_images=60", "--set", "test_images=30", "--set", "epochs=1",
            "--set", "batch_size=20"]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "Table 1" in report and "mnist-scale --split interleaved" in report  # a missing run, named
    table1 = json.loads((tmp_path / "runs" / "mnist-report" / "table1.json").read_text())
    assert table1["rotate"] is not None and table1["scale"] is None
    first = tmp_path / "runs" / "mnist-rotate" / "interleaved" / "metavae" / "seed-0" / "metrics.json"
    stamp = first.stat().st_mtime
    assert main(argv) == 0  # everything finished: nothing reruns
    assert first.stat().st_mtime == stamp
    ledger = json.loads((tmp_path / "runs" / "reproduce-mnist-table1.json").read_text())
    assert [list(launch["runs"]) for launch in ledger["launches"]] == [["mnist-rotate interleaved metavae seed 0"], []]
    assert ledger["runs"]["mnist-rotate interleaved metavae seed 0"]["finished"]
