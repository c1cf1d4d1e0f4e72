"""gptkernels.nn modules are drop-ins for torch.nn.LayerNorm / torch.nn.RMSNorm."""

import pytest
import torch
from conftest import assert_close

from gptkernels import nn as gnn


@pytest.mark.parametrize("shape", [(16,), (4, 8)])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layernorm_module_is_a_drop_in(shape, affine, bias):
    ref = torch.nn.LayerNorm(shape, eps=1e-6, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            if bias:
                ref.bias.normal_()
    ours = gnn.LayerNorm(shape, eps=1e-6, elementwise_affine=affine, bias=bias, backend="cpu")
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, *shape)
    assert_close(ours(x), ref.double()(x.double()), name="y")
    r = torch.randn_like(x)
    y, h = ours(x, residual=r)
    assert_close(y, ref.double()((x + r).double()), name="y (residual)")
    assert torch.equal(h, x + r)


def test_rmsnorm_module_is_a_drop_in():
    ref = torch.nn.RMSNorm(32)  # eps=None: finfo(dtype).eps, as PyTorch
    with torch.no_grad():
        ref.weight.normal_()
    ours = gnn.RMSNorm(32, backend="cpu")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(7, 32, requires_grad=True)
    dy = torch.randn(7, 32)
    y = ours(x)
    dx, dw = torch.autograd.grad(y, (x, ours.weight), dy)
    x64 = x.detach().double().requires_grad_()
    ref64 = ref.double()
    y64 = ref64(x64)
    dx64, dw64 = torch.autograd.grad(y64, (x64, ref64.weight), dy.double())
    assert_close(y, y64, name="y")
    assert_close(dx, dx64, name="dx")
    assert_close(dw, dw64, name="dweight")
    assert "backend='cpu'" in repr(ours)


def test_wrong_trailing_shape_is_a_clear_error():
    m = gnn.LayerNorm((4, 8), backend="cpu")
    with pytest.raises(ValueError, match="does not end with normalized_shape"):
        m(torch.randn(2, 8, 4))
