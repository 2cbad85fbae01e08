"""The ``cuda`` platform plugin: NVIDIA GPUs through torch.cuda, NCCL, CUDA graphs, the shared
Triton kernels and (when installed) flashinfer. Nothing vendor-specific is imported at
package import."""
