"""LoRA dropout in training, checked against its formula and against HF PEFT's training forward.

With x a site's input and p its adapter's rate, each site draws its own mask on every call (m ~ Bernoulli(1 - p)
per entry), in the order the model calls its sites:

    d(x) = x * (m / (1 - p))                                 (nn.Dropout, i.e. F.dropout; eval: d(x) = x, no draw)
    LoRA:     y' = W x + b + s B A d(x)                      (convolution: s B(A(d(x))), A a conv, B a 1x1 conv)
    DoRA:     y' = W x + b + (g - 1) W d(x) + g s B A d(x),  g = mag / ||W + s B A||_row  (norm detached; PEFT's)
    gathered: row i of adapter a(i):  y'_i = W x_i + b + s_a B_a A_a d_a(x_i),  d_a at a's own rate (0: d_a(x) = x)

The formula side: peftc's own draws are recorded (F.dropout, which peftc's plain form calls, or the output of each
site's RowDropout in the gathered form), the masks read off them (m = d(x) != 0), and the reference is the user's
own model with a forward hook on every site that adds the formula's update built from those masks, in call order.
Outputs and gradients (A, B, magnitude, and the input where it is a float tensor) must agree; every test asserts
that masks were drawn, that they dropped something, and that the dropped output is far from the undropped one.

PEFT: with one seed before each side's forward, peftc's plain form draws what PEFT draws, in the same order (llama:
q, k, v, o, gate, up, down per layer; GPT-2's Conv1D; Conv2d), for LoRA and DoRA (eagerly, peftc's dropout is
F.dropout itself). Every mask equals PEFT's; where a site's input is bit-equal to PEFT's, so is its dropped input
(for plain LoRA that is every site, and the outputs come out bit-equal too; DoRA's norm rounds otherwise, so its
later sites differ in the last bits). Outputs must agree within 1e-6, gradients to 1e-4. What cannot match:
- the gathered form: PEFT's mixed batch draws one mask per adapter over that adapter's sub-batch (x[rows]), in the
  iteration order of a Python set of adapter names (string hashing: it changes between processes); peftc draws one
  mask per site over the whole batch at each row's rate. PEFT also refuses a mixed batch in which an adapter is DoRA.
- under torch.compile peftc draws with torch.bernoulli of a tensor rate (a new rate must not recompile): another
  path through the generator. Its statistics are checked here instead.
"""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftc
from peftc.passes.lora import RowDropout
from peftc.passes.lora.ops import _dropout
from tests.models import VOCAB, inputs, main_output, make
from tests.parity import randomize_peft_
from tests.recompiles import fresh_dynamo, no_recompiles  # noqa: F401 (fresh_dynamo: autouse fixture)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]   # PEFT warns about GPT-2's Conv1D

P, R, ALPHA = 0.3, 4, 8
TOL = 1e-5        # ours against the hand-written formula (other rounding); against PEFT: 1e-6
SIGMAS = 5        # binomial tolerance of a kept fraction


class Net(nn.Module):
    """q and k read one input (one group, a mask each), o reads their product."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.o = nn.Linear(16, 12), nn.Linear(16, 12), nn.Linear(12, 8)

    def forward(self, x):                                    # (B, T, 16) -> (B, T, 8)
        return self.o(torch.tanh(self.q(x)) * self.k(x))


class ConvNet(nn.Module):
    """A convolution site (A a 3x3 conv, B a 1x1 conv) and a linear one."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6 * 8 * 8, 5)

    def forward(self, x):                                    # (B, 3, 8, 8) -> (B, 5)
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def gpt2():
    """Tiny GPT-2 without its own dropout, so that the adapters' masks are the only draws."""
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                                            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                            attn_pdrop=0.0)).eval()


def build(arch: str):
    """(fresh model, call inputs, LoRA targets): the same weights on every call."""
    torch.manual_seed(0)
    if arch == "net":
        return Net(), {"x": torch.randn(4, 5, 16)}, ["q", "k", "o"]
    if arch == "conv":
        return ConvNet(), {"x": torch.randn(2, 3, 8, 8)}, ["conv", "fc"]
    if arch == "gpt2":
        return gpt2(), inputs("gpt2"), ["c_attn", "c_proj", "c_fc"]
    return make(arch), inputs(arch), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def example(x: dict):
    return (x["x"],) if "x" in x else None


def call(model, x: dict, **extra) -> torch.Tensor:
    """The main output of model on inputs `x` (custom modules take theirs positionally, as traced)."""
    y = model(x["x"], **extra) if "x" in x else model(**x, **extra)
    return y if isinstance(y, torch.Tensor) else main_output(y)


class Draws:
    """Records every draw while active: each F.dropout in training at a rate > 0 (peftc's plain form and PEFT's
    nn.Dropout both call it) as (input, rate, output), and each torch.bernoulli / Tensor.bernoulli_ call."""

    def __init__(self):
        self.calls, self.bernoulli = [], 0

    def __enter__(self):
        real, real_b, real_b_ = F.dropout, torch.bernoulli, torch.Tensor.bernoulli_

        def dropout(x, p=0.5, training=True, inplace=False):
            x0 = x.detach().clone()
            out = real(x, p, training, inplace)
            if training and p > 0:
                self.calls.append((x0, p, out.detach().clone()))
            return out

        def count(f):
            def g(*a, **k):
                self.bernoulli += 1
                return f(*a, **k)
            return g

        self._patches = [mock.patch("torch.nn.functional.dropout", dropout),
                         mock.patch("torch.bernoulli", count(real_b)),
                         mock.patch.object(torch.Tensor, "bernoulli_", count(real_b_))]
        for p in self._patches:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in self._patches:
            p.stop()


def assert_real_mask(mask: torch.Tensor, p: float) -> None:
    """Something dropped, something kept, and the kept fraction within SIGMAS binomial sigmas of 1 - p."""
    n = mask.numel()
    frac = mask.float().mean().item()
    assert 0 < frac < 1, f"mask of {n} entries keeps {frac:.3f}: nothing was dropped (or nothing kept)"
    assert abs(frac - (1 - p)) <= SIGMAS * math.sqrt(p * (1 - p) / n), f"kept {frac:.4f} of {n}, rate {p}"


# --- the reference: the user's model with the formula's update added at each site by a forward hook -------------

def kind_of(mod: nn.Module) -> str:
    return "conv1d" if isinstance(mod, Conv1D) else "conv" if isinstance(mod, nn.Conv2d) else "linear"


def base_of(mod, kind, d):
    """W d without bias."""
    if kind == "conv1d":
        return d @ mod.weight
    if kind == "conv":
        return F.conv2d(d, mod.weight, None, mod.stride, mod.padding, mod.dilation, mod.groups)
    return F.linear(d, mod.weight)


def update(mod, kind, d, w: dict):
    """s B A d (unscaled by g); a convolution's A has the site's kernel, stride, padding and dilation."""
    if kind == "conv":
        return w["s"] * F.conv2d(F.conv2d(d, w["A"], None, mod.stride, mod.padding, mod.dilation), w["B"])
    return w["s"] * ((d @ w["A"].t()) @ w["B"].t())


def dora_gain(mod, kind, w: dict) -> torch.Tensor:
    """g = mag / ||W + s B A||_row, the norm detached, shaped to broadcast over the site's output."""
    W = mod.weight.t() if kind == "conv1d" else mod.weight.flatten(1)          # (out, in...)
    norm = torch.linalg.norm(W + w["s"] * (w["B"].flatten(1) @ w["A"].flatten(1)), dim=1).detach()
    g = w["m"].flatten() / norm
    return g.view(1, -1, 1, 1) if kind == "conv" else g


def leaf_weights(pm, name: str = "default") -> dict:
    """peftc's adapter `name` at each site as fresh leaf tensors: the reference's own parameters."""
    out = {}
    for key, w in pm.store[name].sites.items():
        t = {"A": w.A_r, "B": w.B_r, "m": w.magnitude}
        out[key.replace("-", ".")] = {"s": w.scale, "p": w.p, **{k: v.detach().clone().requires_grad_()
                                                                for k, v in t.items() if v is not None}}
    return out


def grads_of(pm, name: str = "default") -> dict:
    """The gradients peftc's adapter `name` got, keyed as leaf_weights."""
    out = {}
    for key, w in pm.store[name].sites.items():
        assert w.A.grad is not None and w.B.grad is not None, f"no gradient reached {key}"
        m = None if w.magnitude is None else w.magnitude.grad
        out[key.replace("-", ".")] = {"A": w.A.grad[: w.r], "B": w.B.grad[:, : w.r // w.groups], "m": m}
    return out


def hooked(model, weights: dict, dropped):
    """Forward hooks adding the formula at each site in `weights`; `dropped(path, x)` gives d(x) there (called once
    per site call, in call order). Returns the handles."""
    def hook(path):
        def add(mod, args, y):
            kind, w = kind_of(mod), weights[path]
            d = dropped(path, args[0])
            if "m" not in w:
                return y + update(mod, kind, d, w)
            g = dora_gain(mod, kind, w)
            return y + (g - 1) * base_of(mod, kind, d) + g * update(mod, kind, d, w)
        return add
    return [model.get_submodule(p).register_forward_hook(hook(p)) for p in weights]


def masks_in_order(calls):
    """dropped(path, x) from recorded F.dropout calls: the next call's mask (d(x) = x m / (1 - p)), after checking
    that it was drawn on this site's input (close: the reference's earlier layers round otherwise)."""
    it = iter(calls)

    def dropped(path, x):
        x0, p, out = next(it)              # GPT-2's Conv1D: drawn on x as (N, in), the addmm's operand
        torch.testing.assert_close(x0.view(x.shape), x.detach(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{path}: {m}")
        return x * (out != 0).view(x.shape) / (1 - p)
    return dropped, it


def assert_grad_close(got, want, what: str) -> None:
    """Gradients agree to 1e-4 of the largest entry (they sum over the batch in other orders)."""
    assert torch.isfinite(got).all() and torch.isfinite(want).all(), f"{what}: non-finite gradient"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item(),
                               msg=lambda m: f"gradient of {what}: {m}")


def run(model, x: dict, weight: torch.Tensor | None = None, **extra):
    """The main output and, through a fixed random projection of it, a backward."""
    y = call(model, x, **extra)
    if weight is None:
        weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    (y * weight).sum().backward()
    return y.detach(), weight


def compiled(arch: str, dora: bool = False):
    """peftc on `arch`: random A and B at rate P (DoRA: with spread magnitudes), in training mode."""
    model, x, targets = build(arch)
    pm = peftc.compile(model, peftc.LoRA(r=R, alpha=ALPHA, targets=targets, dropout=P, init=False, use_dora=dora),
                       example_inputs=example(x))
    if dora:                                   # trained-looking magnitudes (a fresh one makes g = 1)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for w in pm.store["default"].sites.values():
                w.magnitude.mul_(1 + 0.3 * torch.randn(w.magnitude.shape, generator=g))
    return pm.train(), x, targets


def with_input_grad(x: dict) -> dict:
    return {k: v.clone().requires_grad_() if v.is_floating_point() else v for k, v in x.items()}


@pytest.mark.parametrize("arch,dora", [("net", False), ("net", True), ("conv", False), ("conv", True),
                                       ("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True)])
def test_plain_form_equals_the_formula_with_the_masks_it_drew(arch, dora):
    pm, x, targets = compiled(arch, dora)
    ours_x = with_input_grad(x)
    torch.manual_seed(11)
    with Draws() as rec:
        y, weight = run(pm, ours_x)
    sites = len(pm.store["default"].sites)
    assert len(rec.calls) == sites, f"{len(rec.calls)} masks drawn for {sites} site calls"
    for x0, p, out in rec.calls:
        assert p == P
        assert_real_mask((out != 0)[x0 != 0], p)          # (where x is 0, so is d(x): no mask to read)

    ref, _, _ = build(arch)
    w = leaf_weights(pm)
    ref_x = with_input_grad(x)
    dropped, left = masks_in_order(rec.calls)
    handles = hooked(ref, w, dropped)
    want, _ = run(ref, ref_x, weight)
    assert next(left, None) is None, "the reference used fewer masks than were drawn"
    torch.testing.assert_close(y, want, rtol=TOL, atol=TOL)
    ours = grads_of(pm)
    for path, t in w.items():
        for k in ("A", "B", "m"):
            if k in t:
                assert_grad_close(ours[path][k], t[k].grad, f"{path}.{k}")
    for k, v in ours_x.items():
        if v.requires_grad:
            assert_grad_close(v.grad, ref_x[k].grad, k)
    for h in handles:
        h.remove()
    hooked(ref, w, lambda path, x: x)                         # the undropped formula is far from the dropped output
    with torch.no_grad():
        undropped = call(ref, x)
    assert (undropped - y).abs().max() > 100 * TOL


# --- the gathered form: each row at its own adapter's rate ---------------------------------------------------------

RATES = {"default": 0.5, "low": 0.1, "none": 0.0}


def gathered(arch: str):
    """`arch` compiled with three adapters of different rates (and ranks); RowDropout hooks record every draw."""
    model, x, targets = build(arch)
    pm = peftc.compile(model, peftc.LoRA(r=R, alpha=ALPHA, targets=targets, dropout=RATES["default"], init=False),
                       example_inputs=example(x))
    pm.add_adapter("low", peftc.LoRA(r=2, alpha=4, targets=targets[:2], dropout=RATES["low"], init=False))
    pm.add_adapter("none", peftc.LoRA(r=2, alpha=2, targets=targets, dropout=RATES["none"], init=False))
    rec: dict[str, list] = {}
    for path, mod in row_dropouts(pm, x).items():
        mod.register_forward_hook(lambda m, a, y, path=path: rec.setdefault(path, []).append(
            (a[0].detach().clone(), a[1].clone(), y.detach().clone())))
    return pm.train(), x, targets, rec


def row_dropouts(pm, x: dict) -> dict[str, RowDropout]:
    """The gathered form's RowDropout of each site (by module path), after a first mixed call builds that form."""
    with torch.no_grad():
        call(pm.eval(), x, adapter_names=row_names(next(iter(x.values())).shape[0]))
    gm = pm.mixed_graph_module              # the form's own modules, each called at its site's module path
    return {list(n.meta["nn_module_stack"].values())[-1][0]: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), RowDropout)}


def row_names(batch: int) -> list[str]:
    return [("default", "low", "none")[i % 3] for i in range(batch)]


@pytest.mark.parametrize("arch", ["net", "llama"])
def test_gathered_form_equals_the_formula_with_each_rows_own_mask(arch):
    pm, x, targets, rec = gathered(arch)
    batch = next(iter(x.values())).shape[0]
    names = row_names(batch)
    ours_x = with_input_grad(x)
    torch.manual_seed(12)
    y, weight = run(pm, ours_x, adapter_names=names)
    ref, _, _ = build(arch)
    paths = targets_paths(ref, targets)
    assert sorted(rec) == sorted(paths) and all(len(v) == 1 for v in rec.values())
    adapters = {n: leaf_weights(pm, n) for n in RATES}
    for path, [(x3, rows, out)] in rec.items():
        for name in RATES:             # each adapter's rows at its rate (0 where it does not target the site)
            p = RATES[name] if path in adapters[name] else 0.0
            mine = [i for i, n in enumerate(names) if n == name]
            if p == 0:
                assert torch.equal(out[mine], x3[mine]), f"{path}: rows of a rate-0 adapter were changed"
            else:
                assert_real_mask(out[mine] != 0, p)

    def row_update(mod, args, y, path):
        x = args[0]
        _, _, out = rec[path][0]
        m = (out != 0).view(x.shape[0], *x.shape[1:])
        rows = []
        for i, name in enumerate(names):
            w = adapters[name].get(path)
            if w is None:
                rows.append(torch.zeros_like(y[i]))
                continue
            d = x[i] * m[i] / (1 - w["p"])
            rows.append(update(mod, "linear", d, w))
        return y + torch.stack(rows)

    for path in paths:
        ref.get_submodule(path).register_forward_hook(lambda m, a, y, path=path: row_update(m, a, y, path))
    ref_x = with_input_grad(x)
    want, _ = run(ref, ref_x, weight)
    torch.testing.assert_close(y, want, rtol=TOL, atol=TOL)
    ours = grads_of(pm)
    for path, t in adapters["default"].items():
        for k in ("A", "B"):
            assert_grad_close(ours[path][k], t[k].grad, f"{path}.{k}")
    for k, v in ours_x.items():
        if v.requires_grad:
            assert_grad_close(v.grad, ref_x[k].grad, k)
    pm.eval()
    with torch.no_grad():
        assert (call(pm, x, adapter_names=names) - y).abs().max() > 100 * TOL


def targets_paths(model, targets) -> list[str]:
    return [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets and not list(m.children())]


# --- statistics ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_dropout_keeps_a_binomial_fraction_and_scales_kept_entries_exactly(p, mode):
    """d(ones) is 0 or one constant c ~ 1/(1 - p) everywhere (dropped: exactly 0), and from the same seed d(x) is
    exactly x * d(ones): every kept entry scaled by the same c. Compiled, the rate is a tensor: a new one does not
    recompile."""
    drop = torch.compile(_dropout, backend="eager", fullgraph=True) if mode == "compiled" else _dropout
    rate = torch.tensor(p)
    x = torch.randn(256, 512)
    torch.manual_seed(0)
    ones = drop(torch.ones_like(x), rate)
    torch.manual_seed(0)
    dx = drop(x, rate)
    values = ones.unique()
    assert values.numel() == 2 and values[0].item() == 0.0, values
    torch.testing.assert_close(values[1].item(), 1 / (1 - p), rtol=1e-6, atol=0)
    assert_real_mask(ones != 0, p)
    assert torch.equal(dx, x * ones)
    if mode == "compiled":
        with no_recompiles():
            assert_real_mask(drop(torch.ones_like(x), torch.tensor(0.5)) != 0, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_rate_held_in_low_precision_drops_at_the_adapters_rate(dtype):
    """0.3 held as a bfloat16 tensor is 0.30078125; the eager path drops at 0.3 (PEFT's rate) all the same."""
    ones = torch.ones(64, 64)
    torch.manual_seed(0)
    want = F.dropout(ones, 0.3, True)
    torch.manual_seed(0)
    assert torch.equal(_dropout(ones, torch.tensor(0.3, dtype=dtype)), want)


def test_gathered_rows_keep_their_own_adapters_fraction():
    """A large batch through the gathered form: row i of adapter a keeps 1 - p_a of its input entries, each scaled
    by exactly 1 / (1 - p_a), and a rate-0 adapter's rows pass unchanged."""
    model = Net()
    x = torch.randn(6, 400, 16)
    pm = peftc.compile(model, peftc.LoRA(r=R, targets=["q"], dropout=RATES["default"], init=False),
                       example_inputs=(x,))
    pm.add_adapter("low", peftc.LoRA(r=R, targets=["q"], dropout=RATES["low"], init=False))
    pm.add_adapter("none", peftc.LoRA(r=R, targets=["q"], dropout=RATES["none"], init=False))
    seen = []
    [drop] = row_dropouts(pm, {"x": x}).values()
    drop.register_forward_hook(lambda m, a, y: seen.append((a[0], y)))
    names = row_names(6)
    with torch.no_grad():
        pm.train()(x, adapter_names=names)
    [(x3, out)] = seen
    for i, name in enumerate(names):
        p = RATES[name]
        if p == 0:
            assert torch.equal(out[i], x3[i])
            continue
        kept = out[i] != 0
        assert_real_mask(kept, p)
        assert torch.equal(out[i][kept], (x3[i] / (1.0 - torch.tensor(p)))[kept])


@pytest.mark.parametrize("form", ["plain", "gathered", "dora"])
def test_eval_mode_draws_nothing_and_is_the_undropped_formula(form):
    pm, x, _ = compiled("net", dora=form == "dora")
    kw = {"adapter_names": ["default"] * 4} if form == "gathered" else {}
    ref, _, _ = build("net")
    w = leaf_weights(pm)
    hooked(ref, w, lambda path, x: x)
    with torch.no_grad():
        want = call(ref, x)
        pm.train()
        torch.manual_seed(0)
        dropped = call(pm, x, **kw)
    pm.eval()
    for grad in (True, False):
        with torch.set_grad_enabled(grad), Draws() as rec:
            y = call(pm, x, **kw)
        assert not rec.calls and not rec.bernoulli, "eval mode drew a mask"
        torch.testing.assert_close(y.detach(), want, rtol=1e-6, atol=1e-6)
    assert (dropped - want).abs().max() > 100 * TOL


# --- PEFT's training forward, from the same seed ----------------------------------------------------------------

def peft_pair(arch: str, dora: bool, tmp_path):
    """PEFT's model (random B, and magnitudes for DoRA) and peftc's loaded from its checkpoint, both training."""
    model, x, targets = build(arch)
    ref = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, lora_dropout=P,
                                           use_dora=dora))
    randomize_peft_(ref, 3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    ref.save_pretrained(tmp_path)
    ours = peftc.load_adapter(build(arch)[0], tmp_path, example_inputs=example(x), is_trainable=True)
    ref = PeftModel.from_pretrained(build(arch)[0], tmp_path, is_trainable=True)
    return ours.train(), ref.train(), x


@pytest.mark.parametrize("arch,dora", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True),
                                       ("conv", False), ("conv", True), ("net", False)])
def test_training_forward_equals_peft_from_the_same_seed(arch, dora, tmp_path):
    ours, ref, x = peft_pair(arch, dora, tmp_path)
    got = {}
    for side, model in (("ours", ours), ("peft", ref)):
        xs = with_input_grad(x)
        torch.manual_seed(21)
        with Draws() as rec:
            y, weight = run(model, xs, got.get("weight"))
        got.update({side: (y, rec.calls, xs), "weight": weight})
    (a, ours_calls, ours_x), (b, peft_calls, peft_x) = got["ours"], got["peft"]
    assert len(ours_calls) == len(peft_calls) == len(ours.store["default"].sites)
    for i, ((x0, p0, d0), (x1, p1, d1)) in enumerate(zip(ours_calls, peft_calls)):
        assert p0 == p1 == P
        x0, d0 = x0.view(x1.shape), d0.view(d1.shape)          # GPT-2's Conv1D: ours drawn on x as (N, in)
        torch.testing.assert_close(x0, x1, rtol=1e-5, atol=1e-5)  # the same site's input, in the same order
        assert torch.equal((d0 != 0), (d1 != 0)), f"draw {i}: another mask than PEFT's"
        assert_real_mask((d0 != 0)[x0 != 0], P)
        if i == 0 or torch.equal(x0, x1):
            assert torch.equal(d0, d1), f"draw {i}: the same input dropped otherwise than PEFT's"
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max().item() <= 1e-6, f"training outputs differ by {(a - b).abs().max().item():.3g}"
    theirs = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    count = 0
    for k, p in ours.store.peft_parameters("default"):
        stem = k.removesuffix(".weight")
        t = theirs.get(f"{stem}.default.weight", theirs.get(f"{stem}.default"))
        assert p.grad is not None and t is not None and t.grad is not None, k
        assert_grad_close(p.grad, t.grad, k)
        count += 1
    assert count == (3 if dora else 2) * len(ours.store["default"].sites)
    for k, v in ours_x.items():
        if v.requires_grad:
            assert_grad_close(v.grad, peft_x[k].grad, k)
    ours.eval()
    with torch.no_grad():
        assert (call(ours, x) - a).abs().max() > 100 * TOL
