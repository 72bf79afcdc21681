"""A CUDA-only backend asked for without CUDA: one line naming the component, the backend and what to set."""

from __future__ import annotations

import pytest
import torch

from recipes.data.cameras import orbit_cameras
from recipes.geometry.backend import BackendNeedsCUDAError, import_backend, require_cuda
from recipes.geometry.hashgrid import HashGridConfig, HashGridEncoding
from recipes.geometry.mesh import TriangleMesh
from recipes.render import gaussians_raster, mesh_raster
from recipes.render.background import SolidColorBackground, SolidColorConfig
from recipes.render.materials import NoMaterial
from recipes.render.volume import VolumeRenderer, VolumeRendererConfig

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "needs CUDA" in message
    return message


@no_cuda
@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: HashGridEncoding(HashGridConfig(backend="tcnn")), "hash grid backend 'tcnn' (tiny-cuda-nn)"),
        (lambda: import_backend("nerfacc", "volume renderer"), "volume renderer backend 'nerfacc' (nerfacc)"),
    ],
)
def test_gpu_only_backends_on_a_cpu_machine_fail_at_construction(build, expected):
    with pytest.raises(BackendNeedsCUDAError) as error:
        build()
    message = _one_line(error)
    assert expected in message and "torch.cuda.is_available() is False" in message
    assert "set backend: torch" in message


def test_rasterizers_refuse_cpu_tensors_with_the_setting_to_use():
    with pytest.raises(BackendNeedsCUDAError) as error:
        mesh_raster.resolve_backend("nvdiffrast", torch.device("cpu"))
    message = _one_line(error)
    assert "mesh rasterizer backend 'nvdiffrast' (nvdiffrast)" in message and "inputs are on cpu" in message
    assert "set backend: torch (or auto)" in message
    with pytest.raises(BackendNeedsCUDAError, match=r"Gaussian rasterizer backend 'gsplat'.*backend: torch"):
        gaussians_raster.resolve_backend("gsplat", torch.device("cpu"))
    # the error comes from the public entry points too, before any CUDA library is touched
    mesh = TriangleMesh(torch.eye(3), torch.tensor([[0, 1, 2]]))
    with pytest.raises(BackendNeedsCUDAError, match="nvdiffrast"):
        mesh_raster.render_mesh(mesh, orbit_cameras(1, height=4, width=4), backend="nvdiffrast")
    # "auto" never asks for CUDA on CPU tensors
    assert mesh_raster.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert gaussians_raster.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_nerfacc_renderer_refuses_cpu_tensors(monkeypatch):
    class Field(torch.nn.Module):
        radius = 1.0

        class config:
            normal_type = "none"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("recipes.render.volume.import_backend", lambda backend, component: object())
    renderer = VolumeRenderer(
        Field(),
        NoMaterial(),
        SolidColorBackground(SolidColorConfig()),
        VolumeRendererConfig(backend="nerfacc"),
    )
    with pytest.raises(BackendNeedsCUDAError) as error:
        renderer.eval()(orbit_cameras(1, height=2, width=2))
    assert "volume renderer backend 'nerfacc'" in _one_line(error)


def test_require_cuda_passes_on_cuda_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    require_cuda("x", "gsplat")
    require_cuda("x", "gsplat", torch.device("cuda", 0))
