"""Triton kernels shared by the cuda, rocm and xpu platform plugins.

Nothing here imports triton at package import: :mod:`.registration` builds lazy
:class:`~heteroserve.core.kernels.registry.KernelSpec` objects whose ``load`` imports the
kernel modules (and triton) only when an implementation is selected.
"""
