"""How the kernels are launched, on the host: output buffers, launch options, the launch itself (device
guard, ``wrap_triton``) and persistent grids. Their configuration is :mod:`.config`; their shared device code
lives in :mod:`.precision` (matrix products per precision mode), :mod:`.trunk_blocks` (index bits, SiLU +
RMSNorm) and :mod:`.head_blocks` (logits, cross-entropy).

Conventions used by every kernel in this package:

* activations are float32 row-major [N, H] (H = hidden, unpadded in memory); in the bf16
  precision mode the stored activations, the stored dz and the index bits that only feed
  products are bfloat16 (every reader rounds them to bf16 for its product anyway; residual
  sums and everything elementwise stay float32) and are upcast on load;
  inside a kernel a row block is a [BLOCK_M, BLOCK_H] register tile whose columns
  >= H are exactly zero (masked loads with other=0), so sums over the padded tile
  equal sums over the H real columns;
* weights are stored as ``nn.Linear`` stores them, [out, in]; a kernel that needs
  W.T loads it transposed through pointer arithmetic; weights are fp32, except that in the bf16
  mode a large output weight is read as its bf16 copy (``weights.head_weight``) and, for a
  large batch, the fused kernels read bf16 copies of all of them (``weights.fused_weights``);
* every matrix product goes through :func:`.precision.dot`, which applies the precision mode
  (operands rounded per mode, accumulation always float32);
* row offsets are int64 so that N * H and N * V may exceed 2**31.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from aunn_fast.params import AUNNParams

from .config import KernelConfig

# What the forward operator computes (its `mode` argument, the kernels' MODE constexpr)
MODE_LOGITS, MODE_ARGMAX, MODE_LOSS = 0, 1, 2


def patch_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns a scalar kernel argument into a 1-element 1-D array and
    implements ``range(n)`` through ``int(array)``, which NumPy >= 2.4 rejects ("only 0-dimensional
    arrays can be converted to Python scalars"). Re-point that one conversion at ``.item()``.
    Only touches Triton's interpreter; :func:`launch` calls it before an interpreted launch (idempotent)."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - other Triton layouts
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_aunn_numpy_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._aunn_numpy_fix = True
    interpreter._patch_lang_tensor = patched


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch through ``torch.library.wrap_triton`` (traceable by torch.compile / export).

    In the interpreter the operators are opaque custom_ops (see ops.py), so the kernel is
    launched directly (torch 2.13's wrap_triton would hand it back unchanged, torch 2.11's
    refuses an interpreted kernel), and not at all on the fake tensors torch.compile and
    opcheck trace with: the traced graph only needs the output buffers' shapes.
    """
    from torch._subclasses.fake_tensor import is_fake
    from torch.library import wrap_triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        patch_interpreter_for_numpy_2_4()
        if not any(isinstance(a, torch.Tensor) and is_fake(a) for a in (*args, *kwargs.values())):
            kernel[grid](*args, **kwargs)
        return
    wrap_triton(kernel)[grid](*args, **kwargs)


def on_device_of(tensor: torch.Tensor):
    """A context in which the tensor's CUDA device is the current one (no-op off CUDA).

    Triton compiles for and launches on the current device, whatever device the tensors
    are on: without this, a model on cuda:1 while cuda:0 is current would have its kernels
    launched on cuda:0 with pointers into cuda:1's memory.
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, poison: bool) -> torch.Tensor:
    """An output buffer: uninitialized, or with poison (KernelOptions.poison_outputs) filled with NaN (floats) /
    -1 (ints), so that tests catch any element a kernel forgot."""
    if poison:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def parameter_pointers(params: AUNNParams) -> dict[str, torch.Tensor]:
    """The fused kernels' parameter arguments, ``in_w_ptr`` ... ``out_b_ptr``: params as the kernels read them
    (fp32, or bf16 weight copies: weights.py)."""
    return {
        "in_w_ptr": params.in_weight,
        "in_b_ptr": params.in_bias,
        "in_g_ptr": params.in_gain,
        "hid_w_ptr": params.hidden_weight,
        "hid_b_ptr": params.hidden_bias,
        "hid_g_ptr": params.hidden_gain,
        "out_w_ptr": params.out_weight,
        "out_b_ptr": params.out_bias,
    }


def numerics(config: KernelConfig) -> dict[str, int | bool]:
    """The trunk kernels' PRECISION and FAST_SIGMOID constexprs: how they multiply, which sigmoid they take."""
    return {"PRECISION": config.precision_code, "FAST_SIGMOID": config.fast_sigmoid}


def compile_options(max_registers: int, num_stages: int = 0) -> dict[str, int]:
    """The launch options capping a kernel's registers per thread (maxnreg) and setting its pipeline depth
    (num_stages), each only when set (0: the compiler's choice)."""
    options = {"maxnreg": max_registers} if max_registers else {}
    return options | ({"num_stages": num_stages} if num_stages else {})


def persistent_programs(config: KernelConfig, row_blocks: int, per_sm: int) -> int:
    """Programs of a persistent grid over row_blocks: per_sm per SM. Under the interpreter 2,
    so that the tests' programs each sum several row blocks."""
    if config.device.interpreted:
        return min(row_blocks, 2)
    return min(row_blocks, per_sm * config.device.sms)
