"""The real `assistant` command without a daemon: global options after the
command, and a plugin's backend named in the config (config check, doctor)."""

from __future__ import annotations

import json

from test_backend_registry import PLUGIN

from assistant.testing import run_cli, short_socket_path


def _plugin_dir(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "tiny.py").write_text(PLUGIN)
    return {"ASSISTANT_PLUGIN_DIR": str(folder)}


def test_global_options_work_after_the_command_and_win_there(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model: from-a\n")
    b.write_text("model: from-b\n")
    assert run_cli("config", "path", "--config", str(b)).stdout.strip() == str(b)
    assert run_cli("--config", str(a), "config", "path").stdout.strip() == str(a)
    assert run_cli("--config", str(a), "config", "path", "--config", str(b)).stdout.strip() == str(b)
    assert "model: from-b" in run_cli("--config", str(a), "config", "show", "--config", str(b)).stdout

    sock = short_socket_path()
    status = run_cli("daemon", "status", "--json", "--socket", str(sock))
    assert status.returncode == 3 and json.loads(status.stdout) == {"running": False, "socket": str(sock)}
    # two levels down (models list), both options after it, no daemon: the local view of that config
    models = run_cli("models", "list", "--socket", str(sock), "--config", str(b), "--json")
    assert models.returncode == 0, models.stderr
    assert json.loads(models.stdout)["default"] == "from-b"
    out = run_cli("ask", "hi", "--no-start", "--socket", str(sock), "--config", str(b))
    assert out.returncode == 1 and str(sock) in out.stderr and "no daemon is listening" in out.stderr
    assert "assistant " in run_cli("models", "list", "--version").stdout


def test_config_check_knows_a_plugin_backend(tmp_path):
    env = _plugin_dir(tmp_path)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("backend: tiny\nmodels:\n  t:\n    path: /m/t.bin\n    paths:\n      tiny: /m/t-tiny.bin\n")
    ok = run_cli("config", "check", config=cfg, env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"ok: {cfg}"
    # without the plugin (--no-plugins after the command) the name is unknown, and says where it is
    off = run_cli("config", "check", "--no-plugins", config=cfg, env=env)
    assert off.returncode == 1
    assert off.stderr.strip() == (f"error: {cfg}:1: backend: expected one of auto, llama.cpp, mlx, remote, got 'tiny'")
    cfg.write_text("backend: auto\nmodels:\n  t:\n    path: /m/t.bin\n    backend: tinyy\n")
    bad = run_cli("config", "check", config=cfg, env=env)
    assert bad.returncode == 1
    assert bad.stderr.strip() == (f"error: {cfg}:5: models.t.backend: expected one of auto, llama.cpp, mlx, remote, tiny "
                                  f"or null, got 'tinyy'; did you mean 'tiny'?")


def test_doctor_chooses_a_plugin_backend_the_config_pins(tmp_path):
    env = _plugin_dir(tmp_path)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("backend: tiny\nthreads: 2\n")
    report = json.loads(run_cli("doctor", "--json", config=cfg, env=env).stdout)
    assert report["config"]["valid"] is True
    assert report["backends"]["tiny"] == {"available": True, "detail": "tiny is always here"}
    assert report["backend"] == {"configured": "tiny", "chosen": "tiny", "reason": "pinned in config"}
    assert report["model"]["backend"] == "tiny" and report["ok"] is True, report["problems"]
    text = run_cli("doctor", config=cfg, env=env).stdout
    assert "chosen:   tiny (pinned in config)" in text
    # with plugins off the same config is invalid, as the daemon would find it
    off = json.loads(run_cli("doctor", "--json", "--no-plugins", config=cfg, env=env).stdout)
    assert off["config"]["valid"] is False and "backend: expected one of auto, llama.cpp, mlx, remote, got 'tiny'" in \
        off["config"]["error"]
