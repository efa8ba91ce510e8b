"""Nothing a file or a config names can run code: checkpoints load tensors and plain values only, and only
allowed ``_target_``s are instantiated, from the command line or from a checkpoint's stored config."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from eblvm.assemble import TRUSTED_TARGETS_VARIABLE, assemble, instantiate_node, rebuild
from eblvm.checkpoints import load_checkpoint, verify_checkpoint
from eblvm.errors import ConfigError
from eblvm.run import run
from tests.conftest import FAST_RUN, ROOT, compose_train_config
from tests.nan_objective import NaNAtSteps

# Four steps validated twice (so best.ckpt and last.ckpt are both written), with few posterior steps.
SHORT = [
    *FAST_RUN,
    "objective.n_lower_steps=2",
    "objective.n_unroll=2",
    "evaluation.gradient_bias_repeats=2",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished four-step run (read only: tests copy what they change)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run(compose_train_config(run_dir, SHORT))
    return run_dir


def python_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# --- 1. a crafted checkpoint runs no code --------------------------------------------------------------------------


class RunsCodeWhenUnpickled:
    """Unpickling this object runs ``touch <marker>``: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def craft(kind: str, finished_run: Path, directory: Path, marker: Path) -> Path:
    """``plain``: a dict holding the payload; ``real``: an eblvm checkpoint with the payload added under a key,
    placed in a copy of its run directory (so everything but the payload is there to rebuild it)."""
    if kind == "plain":
        path = directory / "crafted.ckpt"
        torch.save({"state_dict": {}, "global_step": 0, "payload": RunsCodeWhenUnpickled(marker)}, path)
        return path
    run_dir = directory / "run"
    shutil.copytree(finished_run, run_dir)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["payload"] = RunsCodeWhenUnpickled(marker)
    path = run_dir / "checkpoints" / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(params=["plain", "real"])
def crafted(request, finished_run, tmp_path) -> tuple[Path, Path]:
    """A crafted checkpoint and the file its payload would create."""
    marker = tmp_path / "pwned"
    return craft(request.param, finished_run, tmp_path, marker), marker


def test_load_checkpoint_refuses_a_crafted_checkpoint(crafted):
    path, marker = crafted
    with pytest.raises(ConfigError, match="refused") as refused:
        load_checkpoint(path)
    assert refused.value.value == str(path) and str(path) in str(refused.value)
    assert not marker.exists()
    # the payload is live, so the refusals in these tests are not vacuous: loading the file unsafely runs it
    torch.load(path, weights_only=False)
    assert marker.is_file()


def test_rebuild_refuses_a_crafted_checkpoint(crafted):
    path, marker = crafted
    with pytest.raises(ConfigError) as refused:
        rebuild(path)
    assert str(path) in str(refused.value) and "refused" in str(refused.value)
    assert not marker.exists()


def test_resuming_from_a_crafted_checkpoint_is_refused(crafted, tmp_path):
    path, marker = crafted
    out = tmp_path / "resumed"
    with pytest.raises(ConfigError) as refused:
        run(compose_train_config(out, [*SHORT, "trainer.max_steps=6", f"ckpt_path={path}"]))
    assert refused.value.key == "ckpt_path" and str(path) in str(refused.value)
    assert not marker.exists()
    assert not (out / "config.yaml").exists(), "nothing of a run is written from a refused checkpoint"


@pytest.mark.parametrize("command", ["eblvm.sample", "eblvm.evaluate"])
def test_the_command_line_tools_refuse_a_crafted_checkpoint(crafted, command, tmp_path):
    path, marker = crafted
    result = python_module(command, str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    assert str(path) in result.stderr and "refused" in result.stderr, result.stderr[-3000:]
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["last.ckpt", "best.ckpt"])
def test_a_real_checkpoint_holds_only_tensors_and_plain_values(finished_run, name):
    path = finished_run / "checkpoints" / name
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] in (2, 4)
    assert checkpoint["eblvm"]["format_version"] == 1
    assert checkpoint["eblvm"]["config"]["trainer"]["max_steps"] == 4
    assert isinstance(checkpoint["eblvm_global_rng_states"]["numpy"][1], torch.Tensor)


# --- 2. the _target_ allowlist ---------------------------------------------------------------------------------------

# Callables a crafted config might name: torch's unpickler, a shell, the same reached through an attribute of an
# eblvm module (one outside and one inside the component packages, one of the trusted tests package), and eval.
FORBIDDEN_TARGETS = [
    "torch.load",
    "os.system",
    "eblvm.checkpoints.torch.load",
    "eblvm.models.grbm.torch.load",
    "tests.conftest.torch.load",
    "builtins.eval",
]
# Every config node that is instantiated, by the key its _target_ has in the config (and what composes it).
INSTANTIATED = {
    "data": [],
    "data.splits": [],
    "model": [],
    "posterior": [],
    "objective": [],
    "trainer": [],
    "logger.csv": ["logger=csv"],
    "callbacks.checkpoint": [],
    "callbacks.log_likelihood": [],
    "trainer.plugins[0]": [],
}


def target_override(node: str, target: str) -> str:
    if node == "trainer.plugins[0]":
        return f"++trainer.plugins=[{{_target_:{target}}}]"
    return f"{node}._target_={target}"


@pytest.mark.parametrize("target", FORBIDDEN_TARGETS)
@pytest.mark.parametrize("node", list(INSTANTIATED))
def test_a_target_outside_the_allowlist_is_refused_before_anything_is_written(tmp_path, node, target):
    out = tmp_path / "run"
    cfg = compose_train_config(out, [*FAST_RUN, *INSTANTIATED[node], target_override(node, target)])
    with pytest.raises(ConfigError) as refused:
        run(cfg)
    key = f"{node}._target_"
    assert (refused.value.key, refused.value.value) == (key, target)
    assert f"{key}={target!r}" in str(refused.value)
    assert not (out / "config.yaml").exists()
    assert not out.exists(), f"the refused run wrote {sorted(p.name for p in out.iterdir())}"


def saved_beside(finished_run, tmp_path, checkpoint: dict):
    """``checkpoint`` saved as ``checkpoints/tampered.ckpt`` in a copy of ``finished_run``; the file's path."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    tampered = run_dir / "checkpoints" / "tampered.ckpt"
    torch.save(checkpoint, tampered)
    return tampered


def test_a_checkpoint_whose_stored_config_names_a_forbidden_target_is_refused(finished_run, tmp_path):
    checkpoint = load_checkpoint(finished_run / "checkpoints" / "last.ckpt")
    checkpoint["eblvm"]["config"]["objective"]["_target_"] = "torch.load"
    tampered = saved_beside(finished_run, tmp_path, checkpoint)
    with pytest.raises(ConfigError) as refused:
        rebuild(tampered)
    assert (refused.value.key, refused.value.value) == ("objective._target_", "torch.load")


def test_a_target_built_by_an_interpolation_is_refused(tmp_path):
    """``${oc.create:...}`` makes a node at resolution time, after a check of the unresolved tree: the check must
    see what Hydra would build."""
    marker = tmp_path / "loaded"
    created = f'${{oc.create:"{{_target_: pathlib.Path.touch, _args_: [{marker}]}}"}}'
    node = OmegaConf.create({"_target_": "eblvm.models.GRBM", "v_dim": 2, "h_dim": created})
    with pytest.raises(ConfigError) as refused:
        instantiate_node("model", node)
    assert refused.value.key == "model.h_dim._target_" and refused.value.value == "pathlib.Path.touch"
    assert not marker.exists()


def test_a_checkpoint_whose_stored_config_holds_an_interpolation_is_refused(finished_run, tmp_path):
    checkpoint = load_checkpoint(finished_run / "checkpoints" / "last.ckpt")
    checkpoint["eblvm"]["config"]["model"]["h_dim"] = '${oc.create:"{_target_: torch.load, _args_: [x]}"}'
    tampered = saved_beside(finished_run, tmp_path, checkpoint)
    with pytest.raises(ConfigError, match="interpolations"):
        rebuild(tampered)


def test_a_checkpoint_of_an_unknown_format_is_refused(finished_run, tmp_path):
    checkpoint = load_checkpoint(finished_run / "checkpoints" / "last.ckpt")
    checkpoint["eblvm"]["format_version"] = 99
    tampered = saved_beside(finished_run, tmp_path, checkpoint)
    with pytest.raises(ConfigError, match="format 99"):
        rebuild(tampered)


NAN_OBJECTIVE = ["objective._target_=tests.nan_objective.NaNAtSteps", "+objective.nan_steps=[3]"]


@pytest.mark.parametrize("trusted", ["tests", "mylab.models, tests.nan_objective"])
def test_a_package_is_built_only_when_trusted_through_the_environment(tmp_path, monkeypatch, trusted):
    cfg = compose_train_config(tmp_path, [*FAST_RUN, *NAN_OBJECTIVE])
    monkeypatch.delenv(TRUSTED_TARGETS_VARIABLE, raising=False)
    with pytest.raises(ConfigError) as refused:
        assemble(cfg)
    assert (refused.value.key, refused.value.value) == ("objective._target_", "tests.nan_objective.NaNAtSteps")
    assert TRUSTED_TARGETS_VARIABLE in str(refused.value)

    monkeypatch.setenv(TRUSTED_TARGETS_VARIABLE, trusted)
    parts = assemble(cfg)
    assert type(parts.objective) is NaNAtSteps and parts.objective.nan_steps == {3}
    assert parts.objective.n_lower_steps == 5 and parts.objective.needs_posterior  # the rest of conf/objective/bism


def test_a_run_naming_a_package_that_is_not_trusted_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUSTED_TARGETS_VARIABLE, raising=False)
    with pytest.raises(ConfigError) as refused:
        run(compose_train_config(tmp_path / "run", [*FAST_RUN, *NAN_OBJECTIVE]))
    assert refused.value.key == "objective._target_"
    assert not (tmp_path / "run").exists()


# --- 3. verify_checkpoint tells unreadable from damaged ----------------------------------------------------------


def test_a_checkpoint_without_read_permission_cannot_be_read(finished_run, tmp_path):
    path = tmp_path / "locked.ckpt"
    shutil.copyfile(finished_run / "checkpoints" / "last.ckpt", path)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: a file without read permission is still readable")
        with pytest.raises(ConfigError) as refused:
            verify_checkpoint(path)
        message = str(refused.value)
        assert "cannot be read" in message and "PermissionError" in message, message
        assert "truncated" not in message and "corrupt" not in message
    finally:
        path.chmod(0o600)


def test_verify_checkpoint_tells_an_unreadable_path_from_a_damaged_checkpoint(finished_run, tmp_path):
    folder = tmp_path / "folder.ckpt"
    folder.mkdir()
    with pytest.raises(ConfigError) as refused:
        verify_checkpoint(folder)
    message = str(refused.value)
    assert "cannot be read" in message and "IsADirectoryError" in message, message
    assert "truncated" not in message and "corrupt" not in message

    content = (finished_run / "checkpoints" / "last.ckpt").read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(content[: len(content) // 2])
    with pytest.raises(ConfigError, match="truncated or corrupt") as refused:
        verify_checkpoint(truncated, key="checkpoint")
    assert refused.value.key == "checkpoint" and "cannot be read" not in str(refused.value)

    verify_checkpoint(finished_run / "checkpoints" / "last.ckpt")  # a complete one passes
