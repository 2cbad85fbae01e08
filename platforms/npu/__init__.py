"""Huawei Ascend NPU platform: torch_npu fused operators, HCCL collectives, NPU graphs."""
