"""Import boundaries: the CLI starts without heavy frameworks, and Kiwi only loads for training."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "ray", "mlx", "kiwipiepy", "tokenizers", "pyarrow", "transformers", "matplotlib")


def loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    return set(out.stdout.split())


def test_cli_import_pulls_in_no_heavy_framework():
    assert not loaded_after("import orchestration.cli") & set(HEAVY)


def test_hanyeong_help_pulls_in_no_heavy_framework():
    code = "import sys; sys.argv = ['hanyeong', '--help']\nfrom orchestration.cli import app\ntry:\n    app()\nexcept SystemExit:\n    pass"
    assert not loaded_after(code) & set(HEAVY)


def test_tokenizer_use_does_not_need_kiwi():
    assert "kiwipiepy" not in loaded_after("import tokenizer, tokenizer.bbpe, tokenizer.export, tokenizer.peers")


def test_each_backend_imports_only_its_own_framework():
    torch_side = loaded_after("import cuda_model.backend")
    assert "torch" in torch_side and "mlx" not in torch_side
    if importlib.util.find_spec("mlx") is not None:
        mlx_side = loaded_after("import mlx_model.backend")
        assert "mlx" in mlx_side and "torch" not in mlx_side


def test_spec_checkpoint_and_registry_need_no_framework():
    loaded = loaded_after("import orchestration.core.backends, orchestration.core.checkpoint, orchestration.core.plan, orchestration.core.export_hf")
    assert not loaded & {"torch", "mlx", "ray", "transformers"}


BACKEND_PACKAGES = {"cuda_model", "mlx_model", "torch", "mlx"}


def test_orchestrations_runner_modules_load_no_backend():
    """The runner, the stage, the driver, the launchers and the registry reach a backend only by
    name (orchestration/core/backends.py), never by importing it."""
    modules = ["orchestration.pipeline.runner", "orchestration.pipeline.stage", "orchestration.pipeline.driver",
               "orchestration.core.backends"]  # fmt: skip
    cluster = sorted((REPO / "orchestration" / "cluster").glob("*.py"))
    modules += [f"orchestration.cluster.{p.stem}" for p in cluster if p.stem != "__init__"]
    assert "orchestration.cluster.train_group" in modules and "orchestration.cluster.ring_group" in modules
    assert not loaded_after("import " + ", ".join(modules)) & BACKEND_PACKAGES


def test_capabilities_are_read_without_the_frameworks():
    code = ("from orchestration.core.backends import capabilities\n"
            "assert capabilities('torch').launcher == 'ray_train' and capabilities('mlx').launcher == 'ring'")  # fmt: skip
    assert not loaded_after(code) & {"torch", "mlx", "ray"}
