"""The package imports, reports its build, and falls back to the reference without the extension."""

import json
import os
import subprocess
import sys

import torch

import mtkd_fast

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_reports_the_compiled_extension():
    info = mtkd_fast.build_info()
    json.dumps(info)  # plain data
    assert info["extension_loaded"], f"extension not built: {info['load_error']} (run `make build`)"
    assert info["torch_version"] == torch.__version__, "extension compiled against another torch: rebuild"
    assert info["openmp"] and info["num_threads"] >= 1
    assert isinstance(info["cpu_kernels"], list) and isinstance(info["cuda_kernels"], list)
    if torch.version.cuda and os.environ.get("MTKD_FAST_CUDA", "auto") != "0":
        # on these machines the CUDA toolkit is present: the CUDA part must have been compiled and linked
        assert info["cuda_compiled"], info
        assert info["cuda_archs"] and info["cuda_compiled_version"] >= 12000
    fused = {"logit_kd", "feature_kd", "pooled_cosine", "pooled_cosine_backward", "per_sample_loss_reward"}
    assert fused <= set(info["cpu_kernels"]), info["cpu_kernels"]
    if info["cuda_compiled"]:
        assert fused <= set(info["cuda_kernels"]), info["cuda_kernels"]


def test_import_without_extension_falls_back_and_warns_once(tmp_path):
    # A copy of the pure-Python package without the compiled module, imported in a fresh interpreter under
    # another name (an editable install's import hook would otherwise find the real package first).
    pkg = tmp_path / "mtkd_fast_noext"
    subprocess.run(["cp", "-r", os.path.join(REPO, "mtkd_fast"), str(pkg)], check=True)
    for so in pkg.glob("_C*.so"):
        so.unlink()
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import mtkd_fast_noext as mtkd_fast\n"
        "    mtkd_fast._ext.warn_if_missing()\n"
        "msgs = [str(x.message) for x in w if issubclass(x.category, mtkd_fast.ExtensionMissingWarning)]\n"
        "assert len(msgs) == 1, msgs\n"
        "info = mtkd_fast.build_info()\n"
        "assert info['extension_loaded'] is False and info['cpu_kernels'] == []\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
