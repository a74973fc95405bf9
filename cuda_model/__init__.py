"""PyTorch implementation of the hanyeong model spec (CUDA, or the CPU): model, losses, step, backend.

`orchestration.core.backends.get_backend("torch")` imports `cuda_model.backend` only when asked, so the
rest of hanyeong never needs torch.
"""
