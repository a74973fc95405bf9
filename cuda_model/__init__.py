"""PyTorch implementation of the hanyeong model spec (CUDA, or the CPU): model, losses, step, backend.

`orchestration.core.backends.get_backend("torch")` imports `cuda_model.backend` only when asked, so
the rest of hanyeong never needs torch. What the backend supports is declared here, without torch, for
the runner and the recipe checks (`capabilities("torch")`).
"""

from orchestration.core.backends import Capabilities

CAPABILITIES = Capabilities(
    parallelisms=("ddp", "fsdp"),  # DistributedDataParallel, FSDP2 (cuda_model/parallel.py)
    shard_from_params=1_000_000_000,  # 'auto': shard weights, gradients and AdamW from 1B params
    launcher="ray_train",  # Ray Train's TorchTrainer (orchestration/cluster/train_group.py)
    device_resource="GPU",
    device_required=False,  # a GPU per worker where the cluster has GPUs or [stage.resources] asks
    takes_gpus=True,
)
