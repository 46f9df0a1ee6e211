"""A small model built from stock torch.nn modules only, for tests/test_checkpoint.py.

It lives in its own module, which imports torch and nothing of lstm_fused, so that a process
without lstm_fused can unpickle it (a pickled model names its class by module and name).
"""

import torch
from torch import nn


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
        self.cell = nn.LSTMCell(6, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y, (h_n, c_n) = self.rnn(x)
        h = c = torch.zeros(x.size(0), self.cell.hidden_size)
        for t in range(y.size(1)):
            h, c = self.cell(y[:, t], (h, c))
        return y, h_n, c_n, self.head(h)
