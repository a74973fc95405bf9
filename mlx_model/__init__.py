"""MLX implementation of the hanyeong model spec (Apple silicon; the CPU build on Linux): model,
losses, step, backend.

`orchestration.core.backends.get_backend("mlx")` imports `mlx_model.backend` only when asked, so the
rest of hanyeong never needs mlx. What the backend supports is declared here, without mlx, for the
runner and the recipe checks (`capabilities("mlx")`).
"""

from orchestration.core.backends import Capabilities

CAPABILITIES = Capabilities(
    parallelisms=("ddp",),  # every Mac holds the whole model and AdamW (mlx_model/parallel.py)
    shard_from_params=None,
    launcher="ring",  # a placement group, one rank per Mac, joined by mx.distributed's ring backend
    device_resource="apple_silicon",  # ray start --resources='{"apple_silicon": 1}' on each Mac
    device_required=True,
    takes_gpus=False,  # Metal is the Mac's own; [stage.resources] gpus are for torch
)
