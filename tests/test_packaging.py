"""Package metadata: every third-party import is declared (or optional and named by its extra), a build with the
extension pins the torch it was compiled against, and a missing optional dependency gives one line naming the
extra to install."""

import ast
import os
import runpy
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "mtkd_fast")
# import name -> distribution name, where they differ
DIST = {"PIL": "pillow", "yaml": "pyyaml", "nvidia": "nvidia-dali"}


def _setup_kwargs(monkeypatch, **env) -> dict:
    """The keyword arguments setup.py passes to setuptools.setup, without building anything."""
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(ROOT)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    return captured


def _name(requirement: str) -> str:
    for sep in "=<>![ ;":
        requirement = requirement.split(sep)[0]
    return requirement.strip().lower()


def _guarded(node, parents) -> bool:
    """Whether an import sits in a try block whose handlers catch ImportError (an optional import)."""
    for parent in parents:
        if isinstance(parent, ast.Try) and node in [n for stmt in parent.body for n in ast.walk(stmt)]:
            for handler in parent.handlers:
                names = [handler.type] if not isinstance(handler.type, ast.Tuple) else list(handler.type.elts)
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception")
                       for n in names):
                    return True
    return False


def _third_party_imports():
    """(module, file:line) of every import of a module outside the standard library and this package, except in
    files that check for that module first (a try/except ImportError around an import of it, or matplotlib through
    mtkd_fast/_optional.py, which names the extra)."""
    found = []
    for dirpath, _, filenames in os.walk(PACKAGE):
        for name in filenames:
            if not name.endswith(".py") or name == "_optional.py" and dirpath == PACKAGE:
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            parents = {}
            for parent in ast.walk(tree):
                for child in ast.iter_child_nodes(parent):
                    parents[child] = parent
            guarded = set()  # optional modules this file checks for (try/except ImportError or _optional)
            if any(isinstance(n, ast.ImportFrom) and (n.module or "").endswith("_optional") for n in ast.walk(tree)):
                guarded.add("matplotlib")
            file_found = []
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                chain, p = [], parents.get(node)
                while p is not None:
                    chain.append(p)
                    p = parents.get(p)
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("mtkd_fast", "__future__"):
                        continue
                    if _guarded(node, chain):
                        guarded.add(top)
                        continue
                    file_found.append((top, f"{os.path.relpath(path, ROOT)}:{node.lineno}"))
            # a later import of a module the file has already checked for (the optional path) is fine
            found += [(top, where) for top, where in file_found if top not in guarded]
    return found


def test_every_unguarded_import_is_declared(monkeypatch):
    kwargs = _setup_kwargs(monkeypatch, MTKD_FAST_CUDA="0")
    declared = {_name(r) for r in kwargs["install_requires"]}
    missing = [f"{where}: {top}" for top, where in _third_party_imports()
               if DIST.get(top, top).lower() not in declared]
    assert not missing, ("imports not in setup.py's install_requires (declare them, or import them through "
                         "mtkd_fast/_optional.py with an extra):\n" + "\n".join(missing))
    assert {"torch", "torchvision", "numpy", "tqdm"} <= declared


def test_wheel_pins_the_torch_it_was_built_against(monkeypatch):
    kwargs = _setup_kwargs(monkeypatch, MTKD_FAST_CUDA="0")
    assert kwargs["ext_modules"], "this build has the extension"
    pins = [r for r in kwargs["install_requires"] if _name(r) == "torch"]
    assert pins == ["torch==" + torch.__version__.split("+")[0]]


def test_pure_python_build_takes_any_recent_torch(monkeypatch):
    kwargs = _setup_kwargs(monkeypatch, MTKD_FAST_SKIP_EXT="1")
    assert not kwargs["ext_modules"]
    assert [r for r in kwargs["install_requires"] if _name(r) == "torch"] == ["torch>=2.4"]


def test_extras_named_by_the_code_exist(monkeypatch):
    extras = _setup_kwargs(monkeypatch, MTKD_FAST_CUDA="0")["extras_require"]
    assert {"plots", "dali", "yaml"} <= set(extras)
    assert extras["plots"] == ["matplotlib"]
    assert set(extras["all"]) >= set(extras["plots"] + extras["dali"] + extras["yaml"])


def test_require_names_the_extra(monkeypatch):
    from mtkd_fast import _optional

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(_optional.MissingExtra, match=r"pip install mtkd_fast\[plots\]") as info:
        _optional.require("matplotlib", "plots", "the plot")
    assert isinstance(info.value, ValueError) and isinstance(info.value, ImportError)
    assert "\n" not in str(info.value)


def test_plots_are_skipped_with_one_line_without_matplotlib(monkeypatch, tmp_path, capsys):
    from mtkd_fast import _optional
    from mtkd_fast.train.diagnostics import WeightCurve, plot_teacher_weights

    monkeypatch.setattr(_optional, "_noted", set())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    history = [{"epoch": e, "wl_a": 0.5, "wl_b": 0.5, "wf_a": 0.4, "wf_b": 0.6} for e in range(1, 4)]
    path = tmp_path / "w.png"
    assert plot_teacher_weights([WeightCurve("", history)], ["a", "b"], str(path)) is None
    plot_teacher_weights([WeightCurve("", history)], ["a", "b"], str(path))
    assert not path.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mtkd-fast: the teacher-weights plot skipped: matplotlib is not installed "
                   "(pip install mtkd_fast[plots])"]  # once, not per epoch


def test_plot_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    from mtkd_fast.train.diagnostics import WeightCurve, plot_teacher_weights

    history = [{"epoch": e, "wl_a": 0.5, "wl_b": 0.5, "wf_a": 0.4, "wf_b": 0.6} for e in range(1, 4)]
    path = tmp_path / "w.png"
    plot_teacher_weights([WeightCurve("", history)], ["a", "b"], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
