"""Benchmark suite for lstm_fused: ``python -m benchmarks.run --suite NAME --out DIR``.

One job per module:
  shapes.py    the named suites (a registry of LSTM shapes)
  providers.py what is timed: nn.LSTM, lstm_fused:<backend>, flashrnn
  workload.py  what one timed call does (fwd / fwdbwd) and the inputs it rotates through
  timing.py    interleaved medians (CUDA events on GPU, perf_counter on CPU)
  memory.py    peak GPU memory and bytes saved for backward
  roofline.py  peak rates per device and the floor a run is compared against
  machine.py   what the results were measured on, and the device slug
  report.py    the live table, results.json and results.md
  plots.py     speedup plots (PNG)
  run.py       the command line that ties them together
  warmup_flashrnn.py  compiles FlashRNN's kernels ahead of a GPU run (used by gpu_all.sh)
  gpu_all.sh   the one command for a GPU machine
"""
