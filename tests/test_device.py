import pytest
import torch

from pipeline.config import ConfigError
from pipeline.device import auto_device, device_problem, resolve_device


def test_the_setting_allows_auto_cpu_cuda_and_mps_only():
    for name in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert device_problem(name) is None, name
    for name in ("gpu", "cuda:", "cuda:x", "CPU", 0, None):
        assert device_problem(name) == "auto, cpu, cuda, cuda:N or mps", name
    with pytest.raises(ConfigError, match=r"^device 'gpu' is not auto, cpu, cuda, cuda:N or mps$"):
        resolve_device("gpu")


def test_auto_is_cuda_where_there_is_a_cuda_device():
    assert auto_device(0) == "cpu" and auto_device(2) == "cuda"
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ConfigError, match=r"^device 'cuda:0' was asked for but CUDA is not available; "
                                          r"use --device cpu or auto$"):
        resolve_device("cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_device_the_machine_lacks_is_refused():
    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"^device 'cuda:{n}' was asked for but this machine has {n} CUDA device\(s\), "
                                          rf"cuda:0 to cuda:{n - 1}; use one of them or --device auto$"):
        resolve_device(f"cuda:{n}")
    assert resolve_device(f"cuda:{n - 1}") == torch.device(f"cuda:{n - 1}")
