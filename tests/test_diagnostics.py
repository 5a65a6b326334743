"""twilight.diagnostics.count_ops: each category on small hand-made torch code, and the Triton launch hook."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from twilight import diagnostics
from twilight.diagnostics import count_ops

MODES = [pytest.param(False, id="grad-mode"), pytest.param(True, id="inference-mode")]


def counted(fn, inference: bool = False, **kwargs):
    with torch.inference_mode(inference), count_ops(**kwargs) as c:
        fn()
    return c


# ------------------------------------------------------------------------------------------ views and ops
@pytest.mark.parametrize("inference", MODES)
def test_views_are_not_ops(inference):
    x = torch.randn(4, 6)

    def views():
        x.view(24)
        x.reshape(2, 12)  # a view here: nothing copied
        x.t()
        x.permute(1, 0)
        x[1]
        x[:, 2:4]
        x.unsqueeze(0).squeeze(0)
        x[:, :1].expand(4, 6)
        x.transpose(0, 1)
        x.detach()
        x.view(torch.int32)
        x.split(2)
        x.unbind(0)
        x.chunk(3, dim=1)
        x.as_strided((2, 2), (1, 1))
        x.contiguous()  # already contiguous: no copy

    c = counted(views, inference)
    assert c.ops == 0 and not c.by_op, c.summary()
    assert c.syncs == 0 and c.launches == 0
    assert c.views >= 16
    assert {"aten.view", "aten.t", "aten.select", "aten.slice", "aten.expand", "aten.split"} <= set(c.by_view)


@pytest.mark.parametrize("inference", MODES)
def test_work_ops_are_counted_by_name(inference):
    x, y = torch.randn(4, 6), torch.randn(4, 6)

    def work():
        z = x * y + 1
        z.sum(-1)
        x.t().reshape(24)  # not a view: a copy
        x.t().contiguous()
        x.to(torch.float64)
        x.clone().add_(1)

    c = counted(work, inference)
    assert c.by_op == {"aten.mul": 1, "aten.add": 1, "aten.sum": 1, "aten.clone": 3, "aten._to_copy": 1,
                       "aten.add_": 1}, c.summary()
    assert c.ops == sum(c.by_op.values()) == 8
    assert c.syncs == 0 and c.sync_sites == []


def test_allocations_are_neither_ops_nor_views():
    c = counted(lambda: (torch.empty(3), torch.empty_like(torch.empty(2)), torch.zeros(3)))
    assert c.allocs == 3 and c.by_op == {"aten.zeros": 1}  # zeros fills memory: one op


def test_nothing_counted_outside_the_block():
    x = torch.randn(5)
    with count_ops() as c:
        x.sum()
    x.sum().item()
    assert (c.ops, c.syncs) == (1, 0)


def test_nested_blocks_count_independently():
    x = torch.randn(5)
    with count_ops() as outer:
        x.sum()
        with count_ops() as inner:
            x.sum().item()
    assert (inner.ops, inner.syncs) == (2, 1)
    assert (outer.ops, outer.syncs) == (3, 1)  # the outer block sees the inner block's ops too


# ------------------------------------------------------------------------------------------ syncs
SYNCING = {
    "item": lambda x: x.sum().item(),
    "int": lambda x: int(x[0]),
    "float": lambda x: float(x.max()),
    "bool": lambda x: bool(x.sum() > 0),
    "tolist": lambda x: x.tolist(),
    "mask-index": lambda x: x[x > 0],
    "masked_select": lambda x: torch.masked_select(x, x > 0),
    "nonzero": lambda x: (x > 0).nonzero(),
    "where-1-arg": lambda x: torch.where(x > 0),
    "unique": lambda x: torch.unique(x),
    "repeat_interleave-tensor": lambda x: torch.repeat_interleave(torch.tensor([1, 2, 3])),
    "mask-assign": lambda x: x.clone().__setitem__(x > 0, 0.0),
}
NOT_SYNCING = {
    "int-index": lambda x: x[torch.tensor([0, 2])],
    "masked_fill": lambda x: x.masked_fill(x > 0, 0.0),
    "where-3-arg": lambda x: torch.where(x > 0, x, 0.0),
    "repeat_interleave-int": lambda x: x.repeat_interleave(2),
    "repeat_interleave-output_size": lambda x: torch.repeat_interleave(torch.tensor([1, 2]), output_size=3),
    "topk-sort-cumsum": lambda x: (x.topk(3), x.sort(), x.cumsum(0)),
    "shape": lambda x: x.shape[0] + x.numel() + x.dim(),
}


@pytest.mark.parametrize("inference", MODES)
@pytest.mark.parametrize("name", sorted(SYNCING))
def test_each_sync_counts_once(name, inference):
    x = torch.randn(8)
    c = counted(lambda: SYNCING[name](x), inference)
    assert c.syncs == 1, c.summary()
    (site,) = c.sync_sites
    assert site.where.startswith(f"{__file__}:") or site.where.startswith(os.path.basename(__file__)), site
    assert c.ops >= (0 if name == "tolist" else 1)


@pytest.mark.parametrize("inference", MODES)
@pytest.mark.parametrize("name", sorted(NOT_SYNCING))
def test_no_sync(name, inference):
    x = torch.randn(8)
    c = counted(lambda: NOT_SYNCING[name](x), inference)
    assert c.syncs == 0, c.summary()


def test_item_is_one_op_and_one_sync():
    x = torch.randn(8)
    c = counted(lambda: x.sum().item())
    assert c.by_op == {"aten.sum": 1, "aten._local_scalar_dense": 1}
    assert [s.op for s in c.sync_sites] == ["aten._local_scalar_dense"]
    assert "sync: aten._local_scalar_dense at " in c.summary()


def test_cpu_syncs_false_ignores_cpu_tensors():
    x = torch.randn(8)
    c = counted(lambda: (x.sum().item(), x[x > 0], x.tolist()), cpu_syncs=False)
    assert c.syncs == 0 and c.ops == 4  # sum, _local_scalar_dense, gt, index: counted as ops all the same


def test_device_copies_are_classified_as_syncs():
    """Copies between the CPU and a device, classified on fake CUDA tensors (no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        dev = torch.empty(3, device="cuda")
    host = torch.empty(3)
    cpu = torch.device("cpu")
    is_sync = diagnostics._is_sync
    assert dev.device.type == "cuda"
    assert is_sync("aten._to_copy", (dev,), {"device": cpu}, False)  # device -> host
    assert not is_sync("aten._to_copy", (dev,), {"device": cpu, "non_blocking": True}, False)
    assert is_sync("aten._to_copy", (host,), {"device": torch.device("cuda")}, False)  # blocking host -> device
    assert not is_sync("aten._to_copy", (dev,), {"dtype": torch.float16}, False)  # same device
    assert is_sync("aten.copy_", (host, dev), {}, False)
    assert not is_sync("aten.copy_", (dev, host, True), {}, False)
    assert not is_sync("aten.copy_", (host, torch.empty(3)), {}, True)
    # data-dependent ops sync on the device, and on CPU tensors only when they stand for it (cpu_syncs)
    assert is_sync("aten.nonzero", (dev,), {}, False) and not is_sync("aten.nonzero", (host,), {}, False)
    assert is_sync("aten.nonzero", (host,), {}, True)
    assert is_sync("aten.index", (dev, [dev.bool()]), {}, False)
    assert not is_sync("aten.index", (dev, [dev.long()]), {}, False)


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sync_site_is_the_innermost_twilight_frame(tmp_path, monkeypatch):
    """``where`` names the twilight function that asked (not torch's internals nor the test calling it) and, for
    an op run by other code that twilight called, that code's frame after it."""
    pkg = tmp_path / "twilight"
    pkg.mkdir()
    (tmp_path / "other_lib.py").write_text(
        "def read(x):\n"
        "    return bool(x.any())\n")
    other = _load(tmp_path / "other_lib.py", "other_lib")
    (pkg / "fake_stage.py").write_text(
        "def outer(x):\n"
        "    return inner(x)\n"
        "\n"
        "def inner(x):\n"
        "    return x.sum().item()\n"
        "\n"
        "def via_library(x, lib):\n"
        "    return lib.read(x)\n")
    mod = _load(pkg / "fake_stage.py", "fake_stage")
    monkeypatch.setattr(diagnostics, "_PKG_DIR", str(pkg))
    monkeypatch.setattr(diagnostics, "_PKG_PARENT", str(tmp_path))
    c = counted(lambda: mod.outer(torch.ones(3)))
    assert c.sync_sites == [("aten._local_scalar_dense", os.path.join("twilight", "fake_stage.py") + ":5 in inner")]
    c = counted(lambda: mod.via_library(torch.ones(3), other))
    assert c.sync_sites == [("aten._local_scalar_dense", os.path.join("twilight", "fake_stage.py")
                             + f":8 in via_library > {tmp_path / 'other_lib.py'}:2 in read")]


def test_as_dict_is_json_ready():
    import json

    x = torch.randn(4)
    c = counted(lambda: x[x > 0].sum().item())
    d = json.loads(json.dumps(c.as_dict()))
    assert d["ops"] == c.ops and d["syncs"] == 2 and d["launches"] == 0
    assert [s[0] for s in d["sync_sites"]] == ["aten.index", "aten._local_scalar_dense"]
    assert sum(d["by_op"].values()) == c.ops


# ------------------------------------------------------------------------------------------ Triton
def _triton_or_skip():
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton kernels need TRITON_INTERPRET=1 (CPU interpreter) or a CUDA device")
    return triton


@pytest.fixture(scope="module")
def add_one_kernel():
    triton = _triton_or_skip()
    import triton.language as tl

    @triton.jit
    def _add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=m) + 1, mask=m)

    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

    def launch(x):
        _add_one[(triton.cdiv(x.numel(), 64),)](x, x.numel(), BLOCK=64)

    return launch, device


def test_triton_launch_counts_one_launch_and_no_ops(add_one_kernel):
    launch, device = add_one_kernel
    x = torch.zeros(100, device=device)
    with count_ops() as c:
        launch(x)
    assert c.launches == 1 and c.by_kernel == {"_add_one": 1}
    # the interpreter copies the arguments with torch ops to emulate the launch: not the program's ops
    assert c.ops == 0 and c.syncs == 0, c.summary()
    assert torch.equal(x.cpu(), torch.ones(100))  # the kernel did run
    with count_ops() as outer:
        launch(x)
        with count_ops() as inner:
            launch(x)
            launch(x)
    assert (outer.launches, inner.launches) == (3, 2)
    assert torch.equal(x.cpu(), torch.full((100,), 4.0))


def test_triton_hook_removed_after_the_block(add_one_kernel):
    from triton.runtime.jit import JITFunction

    launch, device = add_one_kernel
    before = JITFunction.__dict__["run"]
    x = torch.zeros(10, device=device)
    with pytest.raises(RuntimeError, match="boom"), count_ops() as c:
        assert diagnostics.triton_hook_installed()
        launch(x)
        raise RuntimeError("boom")
    assert c.launches == 1
    assert not diagnostics.triton_hook_installed()
    assert JITFunction.__dict__["run"] is before
    launch(x)  # after the block: runs, not counted anywhere
    assert c.launches == 1 and torch.equal(x.cpu(), torch.full((10,), 2.0))


# ------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
def test_cuda_syncs_and_copies():
    x = torch.randn(64, device="cuda")
    host = torch.randn(64)
    torch.cuda.synchronize()
    assert counted(lambda: x.sum().item(), cpu_syncs=False).syncs == 1
    assert counted(lambda: x[x > 0], cpu_syncs=False).syncs == 1
    assert counted(lambda: x.cpu(), cpu_syncs=False).syncs == 1
    assert counted(lambda: x.tolist(), cpu_syncs=False).syncs == 1  # one, not one per copy inside tolist
    assert counted(lambda: host.to("cuda"), cpu_syncs=False).syncs == 1
    assert counted(lambda: host.sum().item(), cpu_syncs=False).syncs == 0  # a CPU tensor: no GPU wait
    c = counted(lambda: (x * 2).sum(-1, keepdim=True).masked_fill(x[:1] > 0, 0.0), cpu_syncs=False)
    assert c.syncs == 0 and c.ops == 4, c.summary()  # mul, sum, gt, masked_fill; the slice is a view
