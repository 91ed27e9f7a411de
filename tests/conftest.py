"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one intra-op thread: its tensors are small, so threads gain nothing, and on a shared,
    loaded machine the OpenMP barriers between many tiny kernels make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device(request):
    """The device of a test parametrised with ``indirect=True`` over tests/test_ops.py's DEVICES: ``cpu``,
    ``cuda``, or ``cuda_emu``: the CUDA kernels on the CPU emulator (tests/cuda_emu), whose tensors are CPU
    tensors while ``torch.ops.mtkd_fast.*`` run the emulated kernels."""
    if request.param != "cuda_emu":
        yield request.param
        return
    import cuda_emu

    with cuda_emu.as_cpu_kernels():
        yield "cpu"
