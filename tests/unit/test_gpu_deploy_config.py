"""The GPU deployment's config and launch choices, checked on CPU: the shipped gpu-pd.yaml
loads with the NCCL transport, `cuda` spreads `pd-serve up`'s instances over the visible GPUs,
bad transport settings are clear errors, and the NCCL transport refuses a non-CUDA runner."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pd_serve.config import PDConfig, load_serve_config
from pd_serve.instance.launch import instance_devices
from pd_serve.instance.runtime import _kv_side


def test_gpu_config_loads() -> None:
    cfg = load_serve_config("configs/deploy/gpu-pd.yaml")
    assert (cfg.pd.transport, cfg.model.device, cfg.model.backend) == ("nccl", "cuda", "torch")
    assert cfg.model.dtype == "bfloat16" and cfg.pd.device_checksum == "i32sum"


def test_cuda_spreads_instances_over_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert instance_devices("cuda", 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert instance_devices("cuda:1", 2) == ["cuda:1", "cuda:1"]
    assert instance_devices("cpu", 2) == ["cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="no GPU"):
        instance_devices("cuda", 1)


@pytest.mark.parametrize(("field", "value"), [("transport", "rdma"),
                                              ("device_checksum", "crc32")])
def test_bad_transport_settings(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"pd.{field}"):
        dataclasses.replace(PDConfig(), **{field: value})  # type: ignore[arg-type]


def test_nccl_needs_torch_on_cuda() -> None:
    cfg = load_serve_config("configs/deploy/gpu-pd.yaml")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device="cpu"))
    with pytest.raises(ValueError, match="nccl needs model.backend torch on a cuda device"):
        _kv_side(cfg, object(), 16)  # type: ignore[arg-type]


def test_layerwise_needs_a_runner_with_a_layer_hook() -> None:
    from pd_serve.instance.runtime import make_sender
    from pd_serve.kv.transport import FakeTransport
    from tests.fakes import FakeModelRunner

    cfg = load_serve_config("configs/deploy/local-pd.yaml")
    cfg = dataclasses.replace(cfg, pd=dataclasses.replace(cfg.pd, handoff_layerwise=True))
    transport = FakeTransport()
    with pytest.raises(ValueError, match="handoff_layerwise needs a runner"):
        make_sender(cfg, transport, FakeModelRunner(), 16)
    assert transport.num_registered == 0
