"""Model families (Flax linen; NHWC images; parameters are plain pytrees).

  sit        SiT/DiT backbone: embedders, adaLN-Zero blocks, final layer, construction helpers
             (`build_model`, `init_params`, `model_config`, ...). DiT is this network with integer
             timesteps (see `edit_jax.diffusion.gaussian`).
  dydit      DyDiT: SiT/DiT with timestep-wise width routers and token routers, registered as the
             "dydit" family (`build_model(..., arch="dydit")`); sparse inference slices its weights.
  attention  full attention (`jax.nn.dot_product_attention`) and mediator attention (jnp reference
             of the official `AttentionWithMediators`; the fused kernel is in `edit_jax.kernels`).

`from edit_jax import models; models.build_model("SiT-S/2", ...)` keeps working: the public names
of `sit` are re-exported here.
"""
from edit_jax.models import attention  # noqa: F401
from edit_jax.models.sit import *  # noqa: F401,F403
from edit_jax.models.sit import SiT, build_model, init_params  # noqa: F401  (explicit for readers)
from edit_jax.models import dydit  # noqa: F401,E402  (registers the "dydit" family)
from edit_jax.models.dydit import DyDiT  # noqa: F401,E402
