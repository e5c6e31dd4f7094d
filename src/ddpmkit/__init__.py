"""ddpmkit: denoising diffusion probabilistic models for images.

    import ddpmkit
    cfg = ddpmkit.load_config("configs/mnist.yaml", {"train.max_steps": 2000})
    ddpmkit.train(cfg)                                   # writes runs/... (resumes if rerun)
    run = ddpmkit.load_run("runs/mnist")                 # EMA weights of the latest checkpoint
    images = ddpmkit.sample(run, num=16, sampler="ddim", steps=50)   # uint8 N x C x H x W
"""

from .config import Config, load_config
from .errors import UserError
from .generation import generate, sample
from .run import load_run
from .runtime import version
from .training import train

__version__ = version()

__all__ = ["Config", "UserError", "generate", "load_config", "load_run", "sample", "train",
           "__version__"]
