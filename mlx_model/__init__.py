"""MLX implementation of the hanyeong model spec (Apple silicon; the CPU build on Linux): model,
losses, step, backend.

`orchestration.core.backends.get_backend("mlx")` imports `mlx_model.backend` only when asked, so the
rest of hanyeong never needs mlx.
"""
