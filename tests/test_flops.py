"""FLOPs accounting reproduces the published (fvcore) numbers and agrees with traced/XLA counts."""
import pytest

from edit_jax import flops

# The required figures (GFLOPs, 1 multiply-add = 1 FLOP), to the published rounding.
REQUIRED = [
    ("SiT-S/2", 256, 0, 6.066), ("SiT-S/2", 256, 4, 5.493), ("SiT-S/2", 256, 16, 5.551),
    ("SiT-S/2", 256, 64, 5.785), ("SiT-XL/2", 256, 0, 118.69),
    ("SiT-B/2", 512, 0, 106.46), ("SiT-B/2", 512, 64, 89.72),
    ("SiT-B/2", 1024, 0, 657.64), ("SiT-B/2", 1024, 64, 358.75),
]


@pytest.mark.parametrize("name,res,n,ref", REQUIRED + [r for r in flops.PUBLISHED if r not in REQUIRED])
def test_published_gflops(name, res, n, ref):
  """Equal to the published value up to its printed rounding (3 decimals: 5e-4 GFLOPs, i.e.
  ~1e-4 relative at S/2). Dropping any part of the count, e.g. the mediator extras (pooling,
  depthwise conv, bias resizes: ~0.2 % at S/2), fails."""
  got = flops.gflops(flops.model_at(name, res, n))
  decimals = len(repr(float(ref)).split(".")[1])
  assert abs(got - ref) <= 0.5 * 10 ** -decimals + 1e-9, (name, res, n, got, ref)


def test_paper_reductions():
  full = flops.gflops(flops.model_at("SiT-B/2", 512))
  med = flops.gflops(flops.model_at("SiT-B/2", 512, 64))
  assert round((1 - med / full) * 100, 1) == 15.7
  full = flops.gflops(flops.model_at("SiT-B/2", 1024))
  med = flops.gflops(flops.model_at("SiT-B/2", 1024, 64))
  assert round((1 - med / full) * 100, 1) == 45.4


def test_partial_mediator_layers_between_full_and_all():
  full = flops.gflops(flops.model_at("SiT-XL/2", 256))
  all_ = flops.gflops(flops.model_at("SiT-XL/2", 256, 16))
  first4 = flops.gflops(flops.model_at("SiT-XL/2", 256, 16, mediator_layers=4))
  assert all_ < first4 < full
  per_layer = (full - all_) / 28
  assert first4 == pytest.approx(full - 4 * per_layer, rel=1e-9)


@pytest.mark.parametrize("n", [0, 16])
def test_traced_matmuls_match_analytic(n):
  """Every dot/conv in the traced forward, counted from the jaxpr, equals the analytic matmul
  terms (the analytic count adds norms, pooling and resizes, which are not matmuls; pooling with a
  divisible grid is a reshape-mean, and jax.image.resize is counted from its own dots)."""
  m = flops.model_at("SiT-S/2", 256, n)
  b = flops.breakdown(m)
  dots = flops.dot_gflops(m) * 1e9
  matmuls = b.total - b.norms - b.mediator_extra
  if n == 0:
    assert dots == matmuls
  else:
    # depthwise conv is 9 multiply-adds/elt done elementwise (not a dot); bilinear resize is done
    # with small dots inside jax.image.resize: allow that difference only.
    resize_dots = dots - matmuls
    assert 0 <= resize_dots < 0.002 * b.total


@pytest.mark.parametrize("n", [0, 16])
def test_xla_cost_analysis_cross_check(n):
  """XLA counts 2 per multiply-add plus elementwise work: its number / 2 is within 2 % above ours."""
  m = flops.model_at("SiT-S/2", 256, n)
  ours, xla = flops.gflops(m), flops.xla_gflops(m)
  assert ours <= xla * 1.001 and xla < ours * 1.02, (ours, xla)


def _traced_terms(model) -> dict[str, int]:
  """Multiply-adds of every dot/conv in the traced forward, grouped into the breakdown's terms by
  the Flax module that issued them (the jaxpr's name stack): an independent count per term."""
  import math  # noqa: PLC0415
  import jax  # noqa: PLC0415
  from edit_jax import models  # noqa: PLC0415
  params = models.abstract_params(model)
  x, t, y = models.dummy_inputs(model, 1)
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t, y))(params).jaxpr
  terms: dict[str, int] = {}

  def term(stack: str) -> str:
    parts = stack.split("/")  # TokenDense calls nn.Dense.__call__ again: ".../qkv/qkv" -> ".../qkv"
    stack = "/".join(p for i, p in enumerate(parts) if i == 0 or p != parts[i - 1])
    if "x_embedder" in stack:
      return "patch_embed"
    if "t_embedder" in stack or "adaLN_modulation" in stack:
      return "conditioning"
    if stack.endswith(("attn/qkv", "attn/proj")):
      return "attention_linear"
    if "/attn/" in stack:
      return "attention_core"
    if "/mlp/fc" in stack:
      return "mlp"
    if stack.endswith("final_layer/linear"):
      return "final_linear"
    return "unnamed:" + stack  # jax.image.resize's small dots carry no module name

  def walk(j):
    for e in j.eqns:
      name = e.primitive.name
      if name == "dot_general":
        (lc, _), _ = e.params["dimension_numbers"]
        n = math.prod(e.outvars[0].aval.shape) * math.prod(e.invars[0].aval.shape[i] for i in lc)
      elif name == "conv_general_dilated":
        rhs, dn = e.invars[1].aval.shape, e.params["dimension_numbers"]
        n = (math.prod(e.outvars[0].aval.shape) * rhs[dn.rhs_spec[1]]
             * math.prod(rhs[i] for i in dn.rhs_spec[2:]))
      else:
        n = 0
      if n:
        k = term(str(e.source_info.name_stack))
        terms[k] = terms.get(k, 0) + n
      for sub in flops._subjaxprs(e):  # pylint: disable=protected-access
        walk(sub)

  walk(jaxpr)
  return terms


@pytest.mark.parametrize("n", [0, 16])
def test_each_matmul_term_equals_its_traced_modules(n):
  """Each matmul term of the breakdown equals the dots of its own modules in the traced program
  (SiT-S/2 at 256 px: a wrong factor in any single term fails here even if the total hid it)."""
  m = flops.model_at("SiT-S/2", 256, n)
  b = flops.breakdown(m)
  traced = _traced_terms(m)
  for k in ("patch_embed", "conditioning", "attention_linear", "attention_core", "mlp",
            "final_linear"):
    assert getattr(b, k) == traced.pop(k), k
  assert all(k.startswith("unnamed:") for k in traced), traced  # only the bias-resize dots left
  assert (sum(traced.values()) > 0) == (n > 0)


def test_non_matmul_terms_by_hand():
  """The fvcore rules for what is not a matmul, SiT-S/2 at 256 px (N = 256 tokens, D = 384,
  12 blocks, 6 heads, a 16x16 token grid), written out:
    layer_norm (no affine): 4 per element, 2 per block + the final one: 25 x 4 x 256 x 384;
    mediators (n = 16), per block: adaptive_avg_pool2d 1 per input element (256 x 384),
    depthwise 3x3 conv 9 per element (9 x 256 x 384), two bilinear resizes of the 7x7 bias
    tables to the 16x16 grid, 4 per output element (2 x 4 x 6 heads x 16 x 16 x 16)."""
  full = flops.breakdown(flops.model_at("SiT-S/2", 256, 0))
  med = flops.breakdown(flops.model_at("SiT-S/2", 256, 16))
  assert full.norms == med.norms == 25 * 4 * 256 * 384 == 9_830_400
  assert full.mediator_extra == 0
  per_block = 256 * 384 + 9 * 256 * 384 + 2 * 4 * 6 * 16 * 16 * 16
  assert med.mediator_extra == 12 * per_block == 14_155_776
  # and the full-attention core: QK^T and AV, N^2 D each, per block
  assert full.attention_core == 12 * 2 * 256 * 256 * 384
  assert med.attention_core == 12 * 4 * 16 * 256 * 384
  assert med.total == sum(getattr(med, k) for k in (
      "patch_embed", "conditioning", "attention_linear", "attention_core", "mediator_extra", "mlp",
      "norms", "final_linear"))
