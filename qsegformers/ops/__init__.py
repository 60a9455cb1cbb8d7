"""Custom operators. ``ms_deform_attn`` dispatches to the compiled ``qsegformers._C`` kernel or PyTorch."""
from .ms_deform_attn import (
    MS_DEFORM_ATTN_IMPLS,
    MSDeformAttn,
    check_impl,
    compiled_kernel_available,
    ms_deform_attn,
    ms_deform_attn_pytorch,
)

__all__ = [
    "MS_DEFORM_ATTN_IMPLS",
    "MSDeformAttn",
    "check_impl",
    "compiled_kernel_available",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
]
