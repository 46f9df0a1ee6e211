"""ONNX export of ``LSTM``: the recurrence as ONNX's own ``LSTM`` operator.

``torch.onnx.export(..., dynamo=False)`` traces the model with TorchScript; the module then runs
``nn.LSTM.forward`` (see ``modules.py``), whose ``aten::lstm`` the exporter already translates to
ONNX ``LSTM`` nodes, PackedSequence lengths included.
"""


def refuse_projection(proj_size: int) -> None:
    """ONNX's LSTM operator has no projection (W_hr): say so before an exporter fails obscurely."""
    if proj_size > 0:
        raise NotImplementedError(
            "lstm_fused: ONNX export of an LSTM with proj_size > 0 is not supported: ONNX's LSTM "
            "operator has no output projection. Export with proj_size=0, or use torch.export / "
            "AOTInductor, which support it."
        )
