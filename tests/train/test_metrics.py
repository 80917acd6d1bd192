import io
import json
import logging
import sys
import time

import pytest
import torch

from titan.config.schema import MetricsConfig
from titan.train import metrics
from titan.train.metrics import MetricsLogger, device_peak_tflops, format_line, memory_stats

CPU = torch.device("cpu")
GPU = torch.device("cuda", 0)  # never touched: the name lookup and memory calls are patched


def make_logger(run_dir, cfg=None, *, start_step=0, enabled=True, device=CPU, total_steps=100, **kw):
    return MetricsLogger(
        cfg or MetricsConfig(tensorboard=False, progress="lines"),
        run_dir,
        enabled=enabled,
        total_steps=total_steps,
        start_step=start_step,
        flops_per_token=kw.pop("flops_per_token", 6e9),
        device=device,
        num_devices=kw.pop("num_devices", 8),
        run_id="run-abc",
        config={"model": {"dim": 64}},
    )


def log_step(m, step, loss=None, **kw):
    args = dict(loss=loss if loss is not None else 10.0 / step, grad_norm=1.5, lr=3e-4, skipped_steps=0)
    args.update(tokens=4096, seconds=2.0, data_seconds=0.1)
    args.update(kw)
    return m.log(step, **args)


def read_jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def fake_gpu(monkeypatch):
    def use(name):
        monkeypatch.setattr(metrics, "cuda_device_name", lambda device: name)
        monkeypatch.setattr(metrics, "_warned_devices", set())
        stats = {"active_bytes.all.peak": 2 * 1024**3, "reserved_bytes.all.peak": 3 * 1024**3}
        monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: dict(stats))
        resets = []
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(device))
        return resets

    return use


@pytest.fixture
def titan_log():
    """Attach a handler to the "titan" logger at INFO for one test."""
    log = logging.getLogger("titan")
    level, added = log.level, []

    def attach(handler):
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        added.append(handler)
        return handler

    yield attach
    for handler in added:
        log.removeHandler(handler)
    log.setLevel(level)


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA GB200", 2500.0),
        ("NVIDIA RTX A1000", None),  # contains "A100" but is not one
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_tflops_by_device_name(fake_gpu, name, peak):
    fake_gpu(name)
    assert device_peak_tflops(GPU) == peak


def test_unknown_gpu_warns_once_naming_it(fake_gpu, caplog):
    fake_gpu("NVIDIA Mystery 9000")
    with caplog.at_level(logging.WARNING, logger="titan"):
        assert device_peak_tflops(GPU) is None
        assert device_peak_tflops(GPU) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NVIDIA Mystery 9000" in warnings[0].getMessage()


def test_cpu_has_no_peak(caplog):
    with caplog.at_level(logging.WARNING, logger="titan"):
        assert device_peak_tflops(CPU) is None
    assert not caplog.records


def test_mfu_against_hand_computation(fake_gpu, tmp_path):
    resets = fake_gpu("NVIDIA H100 80GB HBM3")
    m = make_logger(tmp_path, device=GPU, flops_per_token=6 * 8e9, num_devices=16)
    rec = log_step(m, 10, tokens=20_000, seconds=4.0, data_seconds=0.5)
    m.close()
    # 20k tokens in 4 s = 5000 tok/s per device; 48 GFLOP/token -> 240 TFLOP/s; 240/989 of the peak
    assert rec["tokens_per_second"] == 5000.0
    assert rec["global_tokens_per_second"] == 80_000.0
    assert rec["tflops"] == pytest.approx(240.0)
    assert rec["mfu"] == pytest.approx(100 * 240.0 / 989.0)
    assert rec["data_share"] == pytest.approx(0.125)
    assert rec["memory_peak_active_gib"] == 2.0 and rec["memory_peak_reserved_gib"] == 3.0
    assert resets == [GPU]  # peaks are per log interval


def test_no_mfu_on_cpu(tmp_path):
    m = make_logger(tmp_path)
    rec = log_step(m, 1)
    m.close()
    assert "mfu" not in rec and "mfu" not in read_jsonl(tmp_path)[0]
    assert rec["tflops"] == pytest.approx(6e9 * 2048 / 1e12)


def test_cpu_memory_is_current_rss():
    before = memory_stats(CPU)["memory_rss_gib"]
    x = torch.ones(64 * 1024 * 1024)  # 256 MiB, written so the pages are resident
    after = memory_stats(CPU)["memory_rss_gib"]
    assert 0.2 < after - before < 0.5
    del x


def test_should_log_first_every_freq_and_last(tmp_path):
    m = make_logger(tmp_path, MetricsConfig(log_freq=10, tensorboard=False, progress="lines"), total_steps=25)
    assert [s for s in range(1, 26) if m.should_log(s)] == [1, 10, 20, 25]
    m.close()


def test_bad_settings_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="log_freq"):
        make_logger(tmp_path, MetricsConfig(log_freq=0))
    with pytest.raises(ValueError, match="progress"):
        make_logger(tmp_path, MetricsConfig(progress="fancy"))
    m = make_logger(tmp_path)
    with pytest.raises(ValueError, match="overwrite"):
        log_step(m, 1, extra={"loss": 1.0})
    with pytest.raises(ValueError, match="seconds"):
        log_step(m, 1, seconds=0.0)
    m.close()


def test_jsonl_schema(tmp_path):
    m = make_logger(tmp_path)
    for step in (1, 10, 20):
        log_step(m, step, extra={"tokens_seen": step * 4096})
    m.close()
    records = read_jsonl(tmp_path)
    assert [r["step"] for r in records] == [1, 10, 20]
    keys = {
        "step",
        "loss",
        "grad_norm",
        "lr",
        "skipped_steps",
        "tokens_per_second",
        "global_tokens_per_second",
    }
    keys |= {"tflops"}
    keys |= {"memory_rss_gib", "data_share", "elapsed_s", "tokens_seen"}
    assert set(records[0]) == keys
    assert records[1]["loss"] == 1.0 and records[1]["lr"] == 3e-4 and records[1]["tokens_seen"] == 40960
    assert records[0]["elapsed_s"] <= records[2]["elapsed_s"]


def test_resume_keeps_each_step_once(tmp_path):
    m = make_logger(tmp_path)
    for step in (1, 10, 20, 30):
        log_step(m, step, loss=1.0)
    m.close()
    records = read_jsonl(tmp_path)
    for r in records:
        r["elapsed_s"] += 1000.0  # as if the first attempt had run for a while
    text = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 31, "lo')  # a crash mid-write
    elapsed_at_20 = records[2]["elapsed_s"]
    m = make_logger(tmp_path, start_step=20)  # the checkpoint was at step 20
    for step in (30, 40):
        log_step(m, step, loss=2.0)
    m.close()
    records = read_jsonl(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (10, 1.0), (20, 1.0), (30, 2.0), (40, 2.0)]
    assert elapsed_at_20 <= records[3]["elapsed_s"] < elapsed_at_20 + 60  # the clock carries on
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_fresh_start_replaces_stale_records(tmp_path):
    m = make_logger(tmp_path)
    log_step(m, 1, loss=1.0)
    m.close()
    m = make_logger(tmp_path, start_step=0)
    log_step(m, 1, loss=2.0)
    m.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path)] == [(1, 2.0)]


def test_tensorboard_scalars_without_duplicates_across_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = MetricsConfig(tensorboard=True, progress="lines")
    m = make_logger(tmp_path, cfg)
    for step in (1, 10, 20, 30):
        log_step(m, step, loss=1.0)
    m.close()
    m = make_logger(tmp_path, cfg, start_step=20)
    for step in (30, 40):
        log_step(m, step, loss=2.0)
    m.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"loss", "grad_norm", "lr", "tokens_per_second", "tflops", "memory_rss_gib"} <= set(
        acc.Tags()["scalars"]
    )
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert loss == [(1, 1.0), (10, 1.0), (20, 1.0), (30, 2.0), (40, 2.0)]
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([3e-4] * 5)


def test_wandb_mode_follows_credentials(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine example.com login u password p\n")
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert metrics.wandb_mode() == "offline"
    netrc_file.write_text("machine api.wandb.ai login user password k3y\n")
    assert metrics.wandb_mode() is None
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert metrics.wandb_mode() == "offline"  # the key is for another host
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    assert metrics.wandb_mode() is None
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert metrics.wandb_mode() is None  # the user's own choice stands


def test_wandb_offline_run_without_login(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("wandb asked for a login"))
    run_dir = tmp_path / "run"
    m = make_logger(run_dir, MetricsConfig(tensorboard=False, wandb=True, progress="lines"))
    assert m._wandb.settings.mode == "offline"
    log_step(m, 1)
    m.close()
    runs = list((run_dir / "wandb").glob("offline-run-*-run-abc"))
    assert len(runs) == 1
    # wandb's service process writes this file; under load finish() can return before its last write
    # reaches the disk, so the history row is waited for (it never comes if the logger logged nothing).
    history = runs[0] / "run-run-abc.wandb"
    deadline = time.monotonic() + 60
    while b"global_tokens_per_second" not in history.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"global_tokens_per_second" in history.read_bytes()  # the history row


def test_disabled_logger_writes_nothing(tmp_path):
    cfg = MetricsConfig(tensorboard=True, wandb=True, progress="bar")
    m = make_logger(tmp_path / "run", cfg, enabled=False)
    rec = log_step(m, 1)
    m.advance(1)
    m.close()
    assert not (tmp_path / "run").exists()
    assert rec["step"] == 1 and rec["tokens_per_second"] == 2048.0


def test_line_has_the_key_numbers():
    rec = {"step": 20, "loss": 6.81234, "grad_norm": 1.2341, "lr": 3e-4, "tokens_per_second": 12345.4}
    rec |= {"tflops": 1.23, "mfu": 34.51, "memory_peak_active_gib": 1.23, "memory_peak_reserved_gib": 2.5}
    rec |= {"data_share": 0.021, "skipped_steps": 0}
    line = format_line(rec, total_steps=100)
    assert line == (
        "step  20/100  loss 6.8123  grad_norm 1.234  lr 3.0e-04  tok/s 12,345  tflops 1.2  mfu 34.5%"
        "  mem 1.2/2.5GiB  data 2%"
    )
    assert format_line(rec | {"skipped_steps": 2}, total_steps=100) == line + "  skipped 2"


def test_lines_mode_logs_plain_text(tmp_path, monkeypatch, titan_log):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: progress=auto gives lines
    out = io.StringIO()
    titan_log(logging.StreamHandler(out))
    m = make_logger(tmp_path, MetricsConfig(tensorboard=False, progress="auto"))
    for step in range(1, 11):
        m.advance(step)
        if m.should_log(step):
            log_step(m, step)
    m.close()
    lines = out.getvalue().splitlines()
    assert [line.split("/")[0] for line in lines] == ["step   1", "step  10"]
    assert "loss 1.0000" in lines[1] and "tok/s 2,048" in lines[1]
    assert "\x1b" not in out.getvalue() and sys.stderr.getvalue() == ""


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_on_terminal_advances_and_lines_scroll_above(tmp_path, monkeypatch, titan_log):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    handler = titan_log(logging.StreamHandler(sys.stderr))  # made before the bar, as a rank's log setup is
    m = make_logger(tmp_path, MetricsConfig(tensorboard=False, progress="auto"), start_step=4)
    m.advance(7)
    task = m._bar._progress.tasks[0]
    assert (task.completed, task.total) == (7, 100)
    assert handler.stream is not terminal  # pointed at rich's proxy while the bar is up
    log_step(m, 10, loss=2.5)
    m.close()
    assert handler.stream is terminal and sys.stderr is terminal
    text = terminal.getvalue()
    assert text.count("loss 2.5000  grad_norm") == 1  # the log line, printed once, above the bar
    assert "━" in text and "eta" in text
