"""LoRA config options, in parity with HF PEFT both ways: rank_pattern, alpha_pattern, layers_to_transform with
layers_pattern, exclude_modules; and the refusals of options that select nothing or are not supported.

PEFT's rules (peft 0.21.2), which peftc must follow; `key` is a module path relative to the user's model:
- rank_pattern / alpha_pattern (peft/utils/other.py, get_pattern_key; used in peft/tuners/lora/model.py,
  LoraModel._create_and_replace): the FIRST key, in dict order, with `re.match(rf"(.*\\.)?({pattern})$", key)`
  gives the rank / alpha of that module; no match: r / lora_alpha. PEFT saves adapter_config.json with
  sort_keys=True (peft/config.py, save_pretrained), so the order, hence the meaning of overlapping keys, is lost on
  reload: the cases here use keys that never match the same module. A key matching no targeted module is only
  warned about (peft/tuners/tuners_utils.py, BaseTuner.inject_adapter); peftc refuses it.
- exclude_modules (peft/tuners/tuners_utils.py, check_target_module_exists), checked before target_modules: a str
  excludes `key` if `re.fullmatch(exclude, key)`; a list if `key in exclude` or `key.endswith("." + e)` for an e.
- layers_to_transform / layers_pattern (same function): applied only to list target_modules matched by their tail
  (an exact-path entry, `key in target_modules`, skips it; a str target_modules with either option is a ValueError).
  The layer index is the first match of `re.match(rf"(?:^|.*?\\.){p}\\.(?P<idx>\\d+)\\.", key)` over the patterns p
  (a str is one pattern); layers_pattern None or empty: `re.match(r".*?\\.[^.]*\\.(?P<idx>\\d+)\\.", key)`. No index:
  not adapted; else adapted iff idx == layers_to_transform (an int) or idx in it (a list).
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

import peftc
from peftc.passes.lora.spec import lora_from_config
from tests.models import make
from tests.parity import MOVED, TOL, assert_parity, assert_same_weights, max_diff, parity_inputs, randomize_peft_

# PEFT warns about GPT-2's Conv1D (fan_in_fan_out) and about options that matched nothing.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]

R, ALPHA = 4, 8
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"],  # gpt2 c_proj: attn and mlp
           "bert": ["query", "value", "dense"]}                                    # bert dense: 4 kinds, pooler too
LAYERS = {"llama": "layers", "gpt2": "h"}                                          # the nn.ModuleList of blocks

# case -> (archs, options for an arch). Every model has 2 blocks.
CASES = {
    # a tail and a regex; no two keys match one module (see the docstring: PEFT's JSON loses the keys' order)
    "rank_pattern": (("llama", "gpt2"), lambda a: {"rank_pattern": {
        "llama": {"v_proj": 6, r"model\.layers\.1\.(self_attn\.q|mlp\.down)_proj": 2},
        "gpt2": {r"h\.0\.attn\.c_attn": 6, r"h\.1\..*c_proj": 2}}[a]}),
    "alpha_pattern": (("llama", "gpt2"), lambda a: {"alpha_pattern": {
        "llama": {"q_proj": 32, r"layers\.1\.mlp\..*": 2}, "gpt2": {r"h\.0\.attn\.c_attn": 32, "c_proj": 2}}[a]}),
    "layers_int": (("llama", "gpt2"), lambda a: {"layers_to_transform": 1, "layers_pattern": LAYERS[a]}),
    # gpt2: no layers_pattern, so the index is the first numbered path segment
    "layers_list": (("llama", "gpt2"), lambda a: {"layers_to_transform": [0],
                                                  **({"layers_pattern": ["layers"]} if a == "llama" else {})}),
    "exclude_list": (("llama", "gpt2", "bert"), lambda a: {"exclude_modules": {
        "llama": ["model.layers.0.self_attn.q_proj", "down_proj"],                 # an exact path and a tail
        "gpt2": ["transformer.h.1.attn.c_attn", "mlp.c_proj"],
        "bert": ["bert.encoder.layer.1.attention.self.query", "attention.output.dense", "pooler.dense"]}[a]}),
    "exclude_regex": (("llama", "bert"), lambda a: {"exclude_modules": {                # gpt2: in the list case
        "llama": r".*\.layers\.1\..*",
        "bert": r".*\.layer\.0\.attention\.self\.value|bert\.pooler\.dense"}[a]}),
}
MATRIX = [pytest.param(arch, case, id=f"{arch}-{case}") for case, (archs, _) in CASES.items() for arch in archs]


def options(arch: str, case: str) -> dict:
    return CASES[case][1](arch)


def peft_model(arch: str, seed: int = 4, **opts):
    """PEFT's LoRA on a fresh `arch` with random lora_B (A is random from its init), in eval mode."""
    ref = get_peft_model(make(arch), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                target_modules=list(TARGETS[arch]), **opts))
    randomize_peft_(ref, seed=seed)
    return ref.eval()


def peft_layout(ref) -> dict[str, tuple[int, float]]:
    """{module path: (rank, scale)} of PEFT's LoRA layers."""
    return {n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
            for n, m in ref.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("arch,case", MATRIX)
def test_peft_adapter_with_option_loads_in_peftc(arch, case, tmp_path):
    """PEFT builds and saves a random adapter with the option; peftc.load_adapter adapts the same modules at the same
    ranks and gives its outputs, unmerged and merged."""
    opts = options(arch, case)
    ref = peft_model(arch, **opts)
    assert peft_layout(ref) != peft_layout(peft_model(arch)), f"{case} changed nothing in PEFT: a bad test case"
    ref.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(make(arch), tmp_path).eval()                  # the option survives PEFT's JSON
    assert peft_layout(again) == peft_layout(ref)

    base = make(arch)
    ours = peftc.load_adapter(base, tmp_path)
    xs = parity_inputs(arch)
    tol = TOL[peftc.LoRA]
    assert_same_weights(ours, ref)
    assert max_diff(ours, base, xs[0]) > MOVED * tol, "the loaded adapter left the output unchanged"
    merged = ours.merge()
    for x in xs:
        assert_parity(ours, ref, x, tol)
        assert_parity(merged, ours, x, tol)


@pytest.mark.parametrize("arch,case", MATRIX)
def test_peftc_adapter_with_option_loads_in_peft(arch, case, tmp_path):
    """peftc.compile takes the option in adapter_config.json form; PeftModel.from_pretrained of its saved random
    adapter gives the same tensors and outputs."""
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": list(TARGETS[arch]),
           **options(arch, case)}
    base = make(arch)
    pm = peftc.compile(base, cfg)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in pm.trainable_parameters():
            p.data.normal_(0, 0.1)
    pm.save_adapter(tmp_path)
    ref = PeftModel.from_pretrained(make(arch), tmp_path).eval()
    assert peft_layout(ref) == peft_layout(peft_model(arch, **options(arch, case))), "PEFT read another layout"
    xs = parity_inputs(arch)
    tol = TOL[peftc.LoRA]
    assert max_diff(pm, base, xs[0]) > MOVED * tol, "the random adapter left the output unchanged"
    assert_same_weights(pm, ref)
    for x in xs:
        assert_parity(pm, ref, x, tol)


class Blocks(nn.Module):
    """Two blocks in `layers`, each with q_proj, k_proj and v_proj: tiny, so that a refusal traces in no time."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({n: nn.Linear(d, d) for n in ("q_proj", "k_proj", "v_proj")})
                                    for _ in range(2))

    def forward(self, x):                                                                   # (B, d)
        for b in self.layers:
            x = x + b["v_proj"](torch.tanh(b["q_proj"](x)) * b["k_proj"](x))
        return x


def refused(cfg: dict, errors, match: str):
    """peftc.compile(Blocks(), cfg) raises one of `errors` naming `match`, and not because an option is unknown."""
    with pytest.raises(errors, match=match) as err:
        peftc.compile(Blocks().eval(), {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA,
                                        "target_modules": ["q_proj", "v_proj"], **cfg}, example_inputs=(EX,))
    assert "is not supported" not in str(err.value), f"the option itself is refused: {err.value}"


EX = torch.randn(2, 8)


@pytest.mark.parametrize("option,key", [("rank_pattern", "k_proj"),                  # a module, but not targeted
                                        ("alpha_pattern", "nowhere_proj")])
def test_pattern_key_that_matches_no_targeted_module_is_refused(option, key):
    """PEFT only warns and ignores such a key (a typo then silently trains at the default rank); peftc refuses it."""
    refused({option: {"q_proj": 2, key: 6}}, peftc.SpecError, key)


@pytest.mark.parametrize("opts", [{"layers_to_transform": [5], "layers_pattern": "layers"},    # no block 5
                                  {"layers_to_transform": 0, "layers_pattern": "h"}],          # gpt2's name
                         ids=["index", "pattern"])
def test_layers_to_transform_selecting_nothing_is_refused(opts):
    with pytest.raises(ValueError, match="not found"):                                # PEFT refuses it too
        get_peft_model(Blocks(), LoraConfig(r=R, target_modules=["q_proj", "v_proj"], **opts))
    refused(opts, (peftc.SpecError, peftc.TargetNotFound), "layers_to_transform|layers_pattern")


# LoRA variants peftc does not implement, at a value that turns them on (KaSA is `kasa_config` in peft 0.21.2; a
# `use_kasa` key is unknown to PEFT, which ignores it with a warning).
VARIANTS = {"use_qalora": True, "kasa_config": {"beta": 0.0001, "gamma": 0.001}}


@pytest.mark.parametrize("key", list(VARIANTS))
def test_unsupported_variant_is_refused_by_compile(key):
    with pytest.raises(peftc.SpecError, match=key):
        peftc.compile(make("gpt2"), {"peft_type": "LORA", "r": R, "target_modules": ["c_attn"], key: VARIANTS[key]})


@pytest.mark.parametrize("key", list(VARIANTS))
def test_unsupported_variant_is_refused_by_load_adapter(key, tmp_path):
    get_peft_model(make("gpt2"), LoraConfig(r=R, target_modules=["c_attn"])).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    assert cfg.get(key) in (None, False), f"PEFT wrote {key}={cfg.get(key)!r}"      # neutral in a plain adapter
    path.write_text(json.dumps({**cfg, key: VARIANTS[key]}))
    with pytest.raises(peftc.SpecError, match=key):
        peftc.load_adapter(make("gpt2"), tmp_path)


# --- lora_bias: B's own bias (PEFT: nn.Linear(r, out, bias=True) as lora_B; key lora_B.bias) -------------------------
def peft_with_lora_bias(arch: str):
    ref = peft_model(arch, lora_bias=True)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if ".lora_B." in n and n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return ref


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])        # llama: its projections have no bias
def test_lora_bias_both_ways_and_merged(arch, tmp_path):
    ref = peft_with_lora_bias(arch)
    ref.save_pretrained(tmp_path / "peft")
    base = make(arch)
    ours = peftc.load_adapter(base, tmp_path / "peft")
    assert_same_weights(ours, ref)
    assert any(k.endswith("lora_B.bias") for k in ours.store.peft_state_dict("default"))
    xs = parity_inputs(arch)
    tol = TOL[peftc.LoRA]
    assert max_diff(ours, peft_model(arch), xs[0]) > MOVED * tol      # the bias moves the output (same A and B)
    merged = ours.merge()                                           # PEFT cannot merge it into llama's layers
    for x in xs:
        assert_parity(ours, ref, x, tol)
        assert_parity(merged, ours, x, tol)
    ours.save_adapter(tmp_path / "ours")
    again = PeftModel.from_pretrained(make(arch), tmp_path / "ours").eval()
    assert again.peft_config["default"].lora_bias
    for x in xs:
        assert_parity(ours, again, x, tol)


def test_lora_bias_in_a_mixed_batch_and_in_export(tmp_path):
    """Rows of a lora_bias adapter beside rows of a plain one equal each alone; export_merged writes the folded bias
    under the layer's own key, and refuses a layer that has no bias to hold it."""
    ref = peft_with_lora_bias("gpt2")
    ref.save_pretrained(tmp_path / "a")
    pm = peftc.load_adapter(make("gpt2"), tmp_path / "a")
    pm.add_adapter("plain", peftc.LoRA(r=2, targets=["c_attn"], init=False))
    x = parity_inputs("gpt2")[0]
    with torch.no_grad():
        mixed = pm(**x, adapter_names=["default", "plain", "default"]).logits
        alone = {n: (pm.set_adapter(n), pm(**x).logits)[1] for n in ("plain", "default")}
    torch.testing.assert_close(mixed[[0, 2]], alone["default"][[0, 2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], alone["plain"][1], rtol=0, atol=1e-5)
    out = peftc.export_merged(pm, tmp_path / "merged", progress=False)
    from transformers import GPT2LMHeadModel

    exported = GPT2LMHeadModel.from_pretrained(out).eval()
    assert_parity(exported, pm, x, TOL[peftc.LoRA])
    llama = peftc.compile(make("llama"), peftc.LoRA(r=2, targets=["q_proj"], lora_bias=True))
    with pytest.raises(peftc.ExportError,
                       match=r"changes the bias at model.layers.0.self_attn.q_proj \(lora_bias\), which has no bias"):
        peftc.export_merged(llama, tmp_path / "llama", progress=False)
    assert not (tmp_path / "llama").exists()


def test_lora_bias_with_dora_is_refused_as_in_peft():
    with pytest.raises(ValueError, match="lora_bias=True is not supported for DoRA"):
        LoraConfig(r=R, target_modules=["q_proj"], use_dora=True, lora_bias=True)
    with pytest.raises(peftc.SpecError, match="lora_bias=True is not supported with DoRA"):
        peftc.LoRA(use_dora=True, lora_bias=True)


@pytest.mark.parametrize("init", ["gaussian", "orthogonal", "pissa", "olora"])
def test_lora_bias_with_an_init_other_than_true_or_false_is_refused_as_in_peft(init):
    """PEFT's LoraConfig refuses lora_bias=True with any init but True / False, so it could not load such an adapter
    saved by peftc: the spec refuses it, and so does the adapter_config.json mapping."""
    with pytest.raises(ValueError, match="lora_bias=True is only supported with init_lora_weights=True or False"):
        LoraConfig(r=R, target_modules=["q_proj"], init_lora_weights=init, lora_bias=True)
    fix = r"lora_bias=True is only supported with init=True or init=False .*pass init=True or False, or lora_bias=False"
    with pytest.raises(peftc.SpecError, match=rf"{fix}") as e:
        peftc.LoRA(r=R, targets=["q_proj"], init=init, lora_bias=True)
    assert f"init={init!r}" in str(e.value)
    cfg = {"peft_type": "LORA", "r": R, "target_modules": ["q_proj"], "init_lora_weights": init, "lora_bias": True}
    with pytest.raises(peftc.SpecError, match=rf"^adapter_config.json: {fix}"):
        lora_from_config(cfg)
    for ok in (True, False):
        assert peftc.LoRA(r=R, init=ok, lora_bias=True).lora_bias
        assert lora_from_config({**cfg, "init_lora_weights": ok}).init is ok


# --- init_lora_weights that move the base weight (PiSSA, OLoRA) and "orthogonal" -------------------------------------
# PEFT overwrites the base layer's weight with the residual W - s B A, and does it again when it loads the adapter (the
# saved config keeps init_lora_weights). peftc keeps the residual inside the compiled module, per adapter.
INITS = [("llama", "pissa"), ("llama", "olora"), ("llama", "orthogonal"), ("gpt2", "pissa"), ("gpt2", "orthogonal")]


@torch.no_grad()
def nudge_(params, seed: int) -> None:
    """A trained-looking adapter: every LoRA tensor moved off its init."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch,init", INITS, ids=[f"{a}-{i}" for a, i in INITS])
def test_peft_adapter_with_init_loads_in_peftc_and_back(arch, init, tmp_path):
    ref = get_peft_model(make(arch), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS[arch],
                                                init_lora_weights=init))
    nudge_([p for n, p in ref.named_parameters() if "lora_" in n], seed=2)
    ref.save_pretrained(tmp_path / "peft")
    ref = PeftModel.from_pretrained(make(arch), tmp_path / "peft").eval()      # PEFT's own reload: residual again
    base = make(arch)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ours = peftc.load_adapter(base, tmp_path / "peft")
    assert ours.store["default"].spec.init == init
    assert_same_weights(ours, ref)
    xs = parity_inputs(arch)
    tol = TOL[peftc.LoRA]
    merged = ours.merge()
    for x in xs:
        assert_parity(ours, ref, x, tol)
        assert_parity(merged, ref, x, tol)
    with ours.disable_adapters():                                                 # the model itself, not a residual
        assert max_diff(ours, make(arch), xs[0]) == 0
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), "the user's model was changed"
    ours.save_adapter(tmp_path / "ours")
    again = PeftModel.from_pretrained(make(arch), tmp_path / "ours").eval()
    for x in xs:
        assert_parity(ours, again, x, tol)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_fresh_residual_init_reproduces_the_model_and_reloads_exactly(init, tmp_path):
    """A fresh PiSSA / OLoRA adapter is the model again (residual + s B A = W, up to rounding) while B A != 0; the
    randomized SVD of pissa_niter_N draws from a fixed seed, so a saved adapter reloads bit for bit."""
    base = make("llama")
    pm = peftc.compile(base, peftc.LoRA(r=R, alpha=ALPHA, targets=["q_proj", "v_proj"], init=init))
    w = pm.store["default"].sites["model-layers-0-self_attn-q_proj"]
    assert w.B.abs().max() > 0.01 and w.residual is not None
    x = parity_inputs("llama")[0]
    assert max_diff(pm, base, x) < 1e-4
    nudge_(pm.trainable_parameters(), seed=3)
    pm.save_adapter(tmp_path)
    loaded = peftc.load_adapter(make("llama"), tmp_path)
    assert torch.equal(loaded.store["default"].sites["model-layers-0-self_attn-q_proj"].residual, w.residual)
    assert max_diff(loaded, pm, x) == 0


def test_residual_inits_refuse_what_they_cannot_serve():
    with pytest.raises(peftc.SpecError, match=r"init 'olora' on transformer.h.0.attn.c_attn \(a GPT-2 Conv1D"):
        peftc.compile(make("gpt2"), peftc.LoRA(r=R, targets=["c_attn"], init="olora"))
    with pytest.raises(peftc.SpecError, match="'orthogonal' needs an even rank"):
        peftc.compile(make("llama"), peftc.LoRA(r=3, targets=["q_proj"], init="orthogonal"))
    pm = peftc.compile(make("llama"), peftc.LoRA(r=R, targets=["q_proj"], init="pissa"))
    pm.add_adapter("plain", peftc.LoRA(r=R, targets=["q_proj"], init=False))
    x = parity_inputs("llama")[0]
    with pytest.raises(peftc.InputError, match=r"adapter 'default' cannot share a batch .* own residual base weights"):
        pm(**x, adapter_names=["default", "plain", "plain"])
    pm.set_adapter("plain")                       # the plain adapter runs on the model's own weight
    alone = peftc.compile(make("llama"), peftc.LoRA(r=R, targets=["q_proj"])).eval()
    alone.store["default"].load_state_dict(pm.store["plain"].state_dict())
    assert max_diff(pm.eval(), alone, x) == 0
