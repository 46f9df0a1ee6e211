"""The PEP 517 build backend of lstm_fused: setuptools, plus the torch the package will run with.

lstm_fused's C++ extension has to be compiled against the very torch that will import it
(libtorch has no stable C++ ABI across releases). pip builds in an isolated environment that
hides the target environment's packages, and naming torch as a build requirement would make pip
download some other torch into that environment. So this backend finds the torch of the
environment being installed into and makes it importable for setup.py:

* ``import torch`` already works (pip --no-build-isolation, python -m build --no-isolation,
  or a torch on PYTHONPATH): that torch.
* pip's isolated build runs this backend with the target interpreter (``sys.executable``) and
  hides that interpreter's own site-packages through PYTHONPATH (a sitecustomize that drops
  them) and PYTHONNOUSERSITE. A subprocess of the same interpreter without those two variables
  sees the real environment: its sys.path entries are appended here, after the isolated
  environment's, so setuptools and ninja still come from the isolated environment.
* Otherwise (no torch in the target environment, or a frontend that builds in a separate
  virtual environment, e.g. ``python -m build`` without --no-isolation): stop with instructions.

Source distributions need no torch: the sdist hooks set LSTM_FUSED_SDIST=1, which tells setup.py
to write the supported torch range as the requirement instead of importing torch.
"""

import importlib.util
import json
import os
import subprocess
import sys

from setuptools import build_meta as _setuptools

_HIDING_VARIABLES = ("PYTHONPATH", "PYTHONNOUSERSITE")

NO_TORCH = """
lstm_fused: no PyTorch found for {python}.

lstm_fused compiles its C++ kernels against the torch it will run with, so torch must be
installed first, into the environment lstm_fused is installed into:

    {python} -m pip install torch      # or the build you need (PyTorch's install page)
    {python} -m pip install <lstm_fused source, sdist or git URL>

If torch is installed and this still appears, the build ran in a separate virtual environment
(python -m build, uv, ...) or could not see torch: build with the environment's own packages,
e.g. `pip install --no-build-isolation .` or `python -m build --wheel --no-isolation`.
"""


def _target_environment_path():
    """sys.path of this interpreter as it runs outside the build isolation."""
    env = {k: v for k, v in os.environ.items() if k not in _HIDING_VARIABLES}
    probe = subprocess.run(
        [sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
        env=env, capture_output=True, text=True, check=True, cwd=os.path.dirname(__file__),
    )
    return json.loads(probe.stdout)


def _make_torch_importable():
    if importlib.util.find_spec("torch") is None:
        for entry in _target_environment_path():
            if entry not in sys.path:
                sys.path.append(entry)
        importlib.invalidate_caches()
    if importlib.util.find_spec("torch") is None:
        sys.exit(NO_TORCH.format(python=sys.executable))


def _needs_torch(hook):
    def wrapped(*args, **kwargs):
        _make_torch_importable()
        return hook(*args, **kwargs)

    wrapped.__name__ = hook.__name__
    return wrapped


def _sdist(hook):
    def wrapped(*args, **kwargs):
        os.environ["LSTM_FUSED_SDIST"] = "1"
        return hook(*args, **kwargs)

    wrapped.__name__ = hook.__name__
    return wrapped


get_requires_for_build_wheel = _needs_torch(_setuptools.get_requires_for_build_wheel)
prepare_metadata_for_build_wheel = _needs_torch(_setuptools.prepare_metadata_for_build_wheel)
build_wheel = _needs_torch(_setuptools.build_wheel)
get_requires_for_build_editable = _needs_torch(_setuptools.get_requires_for_build_editable)
prepare_metadata_for_build_editable = _needs_torch(_setuptools.prepare_metadata_for_build_editable)
build_editable = _needs_torch(_setuptools.build_editable)
get_requires_for_build_sdist = _sdist(_setuptools.get_requires_for_build_sdist)
build_sdist = _sdist(_setuptools.build_sdist)
