"""effnet among its neighbours: every third-party import declared in pyproject.toml, `--version`, every
command's `--help`, `--print-config`, `--pretrained [PATH|TAG]`, and `effnet cache`."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest
import torch
import yaml

import effnet
from effnet.cli import build_parser, main
from effnet.models.weights import WEIGHT_REGISTRY, WeightsError
from effnet.training import TrainConfig

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "effnet"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], set[str]]:
    """(core dependencies, dependencies of the feature extras: every extra but `test`), normalised names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group()) for requirement in requirements}

    extras = project["optional-dependencies"]
    return names(project["dependencies"]), set().union(*(names(r) for k, r in extras.items() if k != "test"))


def third_party_imports() -> list[tuple[str, str, bool]]:
    """(top-level module, file, imported inside a function) for every import of src/effnet outside the
    standard library; imports under `if TYPE_CHECKING:` never run and are left out."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            lazy, ancestor = False, parents.get(node)
            while ancestor is not None:
                if isinstance(ancestor, ast.If) and "TYPE_CHECKING" in ast.unparse(ancestor.test):
                    modules = []
                lazy = lazy or isinstance(ancestor, ast.FunctionDef | ast.AsyncFunctionDef)
                ancestor = parents.get(ancestor)
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("effnet", "__future__"):
                    found.append((top, str(path.relative_to(ROOT)), lazy))
    return found


def test_every_third_party_import_is_declared():
    """Module-level imports run on `import effnet...` and `effnet CMD --help`: they must be core
    dependencies. Imports inside functions serve one feature: its extra may declare them instead."""
    core, extras = declared()
    distributions = packages_distributions()
    imports = third_party_imports()
    assert {"torch", "scipy", "timm"} <= {module for module, _, _ in imports}  # the scan sees them
    problems = []
    for module, path, lazy in imports:
        names = {normalise(name) for name in distributions.get(module, [module])}
        allowed = core | extras if lazy else core
        if not names & allowed:
            where = "dependencies or a feature extra" if lazy else "dependencies (imported at module level)"
            problems.append(f"{path} imports {module} ({', '.join(sorted(names))}): not in {where}")
    assert not problems, "\n".join(problems)


def test_weight_packages_and_runtime_features_are_in_extras():
    """Weights shipped by a package are imported by name at run time; timm serves the tf_ weights."""
    core, extras = declared()
    packages = {s.location for sources in WEIGHT_REGISTRY.values() for s in sources if s.kind == "package"}
    distributions = packages_distributions()
    for package in packages:
        assert {normalise(d) for d in distributions.get(package, [package])} & extras, package
    assert "timm" in extras and "scipy" in core


def test_core_dependencies_have_lower_bounds():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert all(">=" in requirement for requirement in project["dependencies"]), project["dependencies"]


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"effnet {version('effnet')}"
    assert version("effnet") == effnet.__version__


def test_every_command_has_help(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"train", "eval", "predict", "export", "cache", "search", "compare"} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0, command
        assert "usage: effnet" in capsys.readouterr().out


def printed_config(capsys, *flags: str) -> dict:
    assert main(["train", "--print-config", *flags]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_is_the_config_that_would_run(capsys, tmp_path):
    shown = printed_config(capsys, "--data", "digits", "--epochs", "2", "--no-progress", "--lr", "0.01")
    assert TrainConfig().replace(**shown) == TrainConfig().replace(data="digits", epochs=2, progress=False, lr=0.01)
    # Edited and given back with --config: the file's settings, overridden by the flags typed.
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump(shown | {"batch_size": 16}))
    again = printed_config(capsys, "--config", str(file), "--epochs", "5")
    assert again == shown | {"batch_size": 16, "epochs": 5}


def test_config_errors_are_one_line(capsys, tmp_path):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "--print-config" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nwarp_speed: 9\n")
    assert main(["train", "--config", str(bad)]) == 1
    assert "warp_speed" in capsys.readouterr().err


def test_pretrained_takes_a_path_or_a_tag(capsys):
    assert printed_config(capsys)["pretrained"] is False
    assert printed_config(capsys, "--pretrained")["pretrained"] is True
    assert printed_config(capsys, "--pretrained", "weights.pth")["pretrained"] == "weights.pth"
    assert printed_config(capsys, "--pretrained", "offline", "--no-pretrained")["pretrained"] is False
    registered = effnet.create_model("efficientnet_lite0", pretrained=True)
    tagged = effnet.create_model("efficientnet_lite0", pretrained="offline")  # the lite0 package's weights
    for key, value in registered.state_dict().items():
        assert torch.equal(value, tagged.state_dict()[key]), key
    with pytest.raises(WeightsError, match=r"neither a weights file nor a weight tag .*offline, timm, ra_in1k"):
        effnet.create_model("efficientnet_lite0", pretrained="imagenet21k")


def test_one_meaning_per_flag(capsys):
    """-q is the log level; the progress bars are train's --no-progress (train has no --quiet of its own)."""
    assert printed_config(capsys, "--no-progress")["progress"] is False
    with pytest.raises(SystemExit):
        main(["train", "--quiet", "--print-config"])
    assert "unrecognized arguments: --quiet" in capsys.readouterr().err


def test_cache_command_shows_and_clears_parts(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EFFNET_RUNS", str(tmp_path / "runs"))
    files = {"data/extracted/a-0123/x.png": 3000, "data/decoded/k.npz": 2000, "data/cifar/b.bin": 500}
    files["runtime/choices.json"] = 40
    for name, size in files.items():
        (tmp_path / "cache" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cache" / name).write_bytes(b"x" * size)
    assert main(["cache"]) == 0
    shown = capsys.readouterr().out
    for part, size in [("extracted", "3.0 kB"), ("decoded", "2.0 kB"), ("downloads", "500 B"), ("runtime", "40 B")]:
        assert re.search(rf"{part}\s+{size}\s+1 files", shown), shown
    assert re.search(r"total\s+5.5 kB", shown) and str(tmp_path / "runs") in shown
    assert main(["cache", "--clear", "downloads"]) == 0
    left = {str(p.relative_to(tmp_path / "cache")) for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert left == set(files) - {"data/cifar/b.bin"}
    assert main(["cache", "--clear"]) == 0 and not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
