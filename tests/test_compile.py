"""torch.compile(fullgraph=True, dynamic=True) of a small stack of MBWQ layers: no graph breaks,
equal to eager, and few compiled frames over many batch sizes (the fake kernels must not
guard on M).

Frames are counted by a backend that counts its calls and delegates to aot_eager (which runs
the fake kernels and the autograd formula through AOTAutograd); one test uses inductor.
"""
import pytest
import torch
from torch import nn
from torch._dynamo.backends.registry import lookup_backend

from layers import LayerSpec, device_params, make_layer
from strategies import random_x

M_VALUES = (1, 3, 17, 64)


class Stack(nn.Module):
    def __init__(self, device):
        super().__init__()
        self.a, _ = make_layer(LayerSpec(256, 96, True, (8, 5, 3, 2), (64, 64, 64, 64), bias=True, seed=31), device)
        self.b, _ = make_layer(LayerSpec(96, 40, False, w_bit=4, group_size=32, seed=32), device)

    def forward(self, x):
        return self.b(nn.functional.gelu(self.a(x)))


class CountingBackend:
    def __init__(self, inner="aot_eager"):
        self.frames = 0
        self.inner = lookup_backend(inner)

    def __call__(self, gm, example_inputs):
        self.frames += 1
        return self.inner(gm, example_inputs)


@pytest.fixture(params=device_params())
def stack(request):
    torch._dynamo.reset()
    yield Stack(request.param), request.param
    torch._dynamo.reset()


def run(model, device, unbacked, backend, sizes=M_VALUES, dtype=torch.float16, lead=()):
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    for M in sizes:
        x = random_x((*lead, M, 256), dtype, M, device)
        if unbacked:
            torch._dynamo.decorators.mark_unbacked(x, len(lead))
        with torch.no_grad():
            y, y_eager = compiled(x), model(x)
        assert y.shape == (*lead, M, 40) and y.dtype == dtype
        yield y, y_eager


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compile_dynamic_at_most_two_frames(stack, dtype):
    model, device = stack
    backend = CountingBackend()
    for y, y_eager in run(model, device, False, backend, dtype=dtype):
        assert torch.equal(y, y_eager)
    # plain dynamic=True: size 1 is specialised, every other M shares one frame
    assert 1 <= backend.frames <= 2


def test_compile_unbacked_batch_one_frame(stack):
    model, device = stack
    backend = CountingBackend()
    for y, y_eager in run(model, device, True, backend, sizes=M_VALUES + (0, 118)):
        assert torch.equal(y, y_eager)
    assert backend.frames == 1


def test_compile_unbacked_leading_dims_one_frame(stack):
    model, device = stack
    backend = CountingBackend()
    for y, y_eager in run(model, device, True, backend, lead=(2,)):
        assert torch.equal(y, y_eager)
    assert backend.frames == 1


def test_compile_backward_matches_eager(stack):
    model, device = stack
    backend = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    for M in (3, 17, 64):
        x = random_x((M, 256), torch.float16, M, device)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = random_x((M, 40), torch.float16, M + 1, device)
        compiled(xc).backward(g)
        model(xe).backward(g)
        assert torch.equal(xc.grad, xe.grad)
    assert 1 <= backend.frames <= 2


def test_compile_inductor_unbacked(stack):
    # one real compile (inductor generates code around the opaque mbwq ops)
    model, device = stack
    backend = CountingBackend("inductor")
    for y, y_eager in run(model, device, True, backend):
        torch.testing.assert_close(y, y_eager, rtol=2e-3, atol=2e-3)
    assert backend.frames == 1
