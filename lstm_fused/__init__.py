"""lstm_fused: a drop-in torch.nn.LSTM with fused CUDA, Triton and C++ CPU kernels."""

from .dispatch import BACKENDS, available_backends
from .modules import LSTM, LSTMCell, convert

__all__ = ["LSTM", "LSTMCell", "convert", "available_backends", "BACKENDS"]
__version__ = "0.1.0"
