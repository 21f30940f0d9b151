"""IA3 end to end: PEFT's defaults and checkpoints both ways (Llama, Qwen2, Mistral, GPT-2, BERT, ViT, an MLP, a
Conv2d model), merged == unmerged, mixed batches with LoRA, a declared capacity, training, counts, refusals."""
from __future__ import annotations

import json

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from peft.tuners.ia3 import IA3Layer
from torch import nn

import peftc
from tests.compare import assert_differs
from peftc.errors import SpecError
from peftc.methods import method_of
from tests.models import inputs, main_output, make
from tests.parity import parity_inputs, randomize_ours_
from tests.recompiles import fresh_dynamo, no_recompiles  # noqa: F401 (fresh_dynamo: autouse fixture)

TOL = 1e-5
# PEFT has no IA3 default for ViT: it is given the layers peftc picks from the graph
PEFT_ARGS = {"vit": dict(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"])}


def out(f, x) -> torch.Tensor:
    with torch.no_grad():
        r = f(**x) if isinstance(x, dict) else f(*x)
    return r if isinstance(r, torch.Tensor) else main_output(r)


def diff(a, b, x) -> float:
    return (out(a, x) - out(b, x)).abs().max().item()


def peft_layers(ref) -> dict[str, bool]:
    """Module path -> is_feedforward of every layer PEFT put an IA3 vector on."""
    return {n.removeprefix("base_model.model."): m.is_feedforward for n, m in ref.named_modules()
            if isinstance(m, IA3Layer)}


def ours_layers(pm, name="default") -> dict[str, bool]:
    ad = pm.store[name]
    return {p: ad.sites[p.replace(".", "-")].feedforward for p in ad.targets}


def random_peft(arch: str, seed: int = 3):
    """PEFT's IA3 on `arch` with random vectors (init_ia3_weights=False draws N(0, 1), from `seed`)."""
    torch.manual_seed(seed)
    return get_peft_model(make(arch), IA3Config(init_ia3_weights=False, **PEFT_ARGS.get(arch, {}))).eval()


# --- defaults ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "bert", "vit"])
def test_default_targets_are_peft_defaults(arch):
    pm = peftc.compile(make(arch), peftc.IA3())
    assert ours_layers(pm) == peft_layers(random_peft(arch))
    assert diff(pm, make(arch), inputs(arch)) == 0.0           # l = 1: a fresh adapter is the identity


@pytest.mark.parametrize("arch, targets, ff", [
    ("llama", ["down_proj", "k_proj", "v_proj"], ["down_proj"]),
    ("qwen2", ["down_proj", "q_proj", "v_proj"], ["down_proj"]),
    ("gpt2", ["attn.c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    ("bert", ["output.dense", "self.key", "self.value"], ["output.dense"]),     # PEFT's: attention output too
])
def test_default_names_in_the_config_are_peft_names(arch, targets, ff, tmp_path):
    peftc.compile(make(arch), peftc.IA3()).save_adapter(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["target_modules"], cfg["feedforward_modules"]) == ("IA3", targets, ff)
    assert cfg["init_ia3_weights"] is True and cfg["fan_in_fan_out"] is False


@pytest.mark.parametrize("spec, ff", [
    (peftc.IA3(feedforward=["k_proj"]), {"k_proj"}),                           # default targets, own feedforward
    (peftc.IA3(targets=r".*\.(k_proj|v_proj|down_proj)"), {"down_proj"}),      # regex targets, default feedforward
    (peftc.IA3(targets=["k_proj", "v_proj", "down_proj"]), {"down_proj"}),
    (peftc.IA3(targets="all-linear", feedforward=".*mlp.*"), {"gate_proj", "up_proj", "down_proj"}),
    (peftc.IA3(exclude_modules=["down_proj"]), set()),
])
def test_explicit_forms_select_the_same_layers_in_peft(spec, ff, tmp_path):
    pm = peftc.compile(make("llama"), spec)
    layers = ours_layers(pm)
    assert {p.rsplit(".", 1)[1] for p, f in layers.items() if f} == ff
    pm.save_adapter(tmp_path)
    assert peft_layers(PeftModel.from_pretrained(make("llama"), tmp_path)) == layers


# --- checkpoints both ways -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", *[pytest.param(a, marks=pytest.mark.slow) for a in ("bert", "vit")]])
def test_peft_checkpoint_loads_into_peftc_and_merges(arch, tmp_path):
    ref = random_peft(arch)
    ref.save_pretrained(tmp_path)
    ours = peftc.load_adapter(make(arch), tmp_path)
    sd = {k: v for k, v in ref.state_dict().items() if "ia3_l" in k}
    mine = ours.store.peft_state_dict("default")
    assert {k.replace(".ia3_l.default", ".ia3_l") for k in sd} == set(mine)
    assert all(torch.equal(mine[k.replace(".ia3_l.default", ".ia3_l")], v) for k, v in sd.items())
    merged = ours.merge()
    for x in parity_inputs(arch):
        assert diff(ours, ref, x) <= TOL and diff(merged, ref, x) <= TOL
        assert diff(merged, ours, x) <= TOL
    assert diff(ours, make(arch), parity_inputs(arch)[0]) > 100 * TOL, "the adapter left the output unchanged"


@pytest.mark.parametrize("arch", ["llama", "gpt2", *[pytest.param(a, marks=pytest.mark.slow) for a in ("bert", "vit")]])
def test_peftc_checkpoint_loads_into_peft(arch, tmp_path):
    torch.manual_seed(4)
    pm = peftc.compile(make(arch), peftc.IA3(init_ia3_weights=False))
    pm.save_adapter(tmp_path)
    ref = PeftModel.from_pretrained(make(arch), tmp_path).eval()
    assert peft_layers(ref) == ours_layers(pm)
    for x in parity_inputs(arch):
        assert diff(pm, ref, x) <= TOL
    assert diff(pm, make(arch), parity_inputs(arch)[0]) > 100 * TOL


class MLP(nn.Module):
    """PEFT's custom test model "MLP", small: Linear layers with biases."""

    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(10, 20), nn.Linear(20, 20), nn.Linear(20, 2)

    def forward(self, x):                                    # (B, 10)
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class ConvNet(nn.Module):
    """PEFT's custom test model "Conv2d", small: a Conv2d, a Conv3d and a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(3, 6, 3)
        self.conv3d = nn.Conv3d(6, 4, 1)
        self.lin0 = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):                                    # (B, 3, 6, 6)
        h = torch.relu(self.conv2d(x))                       # (B, 6, 4, 4)
        h = self.conv3d(h.unsqueeze(2)).squeeze(2)           # (B, 4, 4, 4)
        return self.lin0(h.flatten(1))


CUSTOM = {"mlp": (MLP, lambda b, s: (torch.randn(b, 10, generator=torch.Generator().manual_seed(s)),),
                  ["lin0", "lin1"], ["lin1"]),
          "conv": (ConvNet, lambda b, s: (torch.randn(b, 3, 6, 6, generator=torch.Generator().manual_seed(s)),),
                   ["conv2d", "conv3d", "lin0"], ["conv3d", "lin0"])}


def custom(kind: str):
    cls, xs, targets, ff = CUSTOM[kind]
    torch.manual_seed(0)
    return cls().eval(), xs, targets, ff


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_custom_models_both_ways_and_merged(kind, tmp_path):
    model, xs, targets, ff = custom(kind)
    torch.manual_seed(5)
    ref = get_peft_model(custom(kind)[0], IA3Config(target_modules=targets, feedforward_modules=ff,
                                                    init_ia3_weights=False)).eval()
    ref.save_pretrained(tmp_path / "peft")
    ours = peftc.load_adapter(model, tmp_path / "peft", example_inputs=xs(2, 0))
    assert ours_layers(ours) == peft_layers(ref)
    merged = ours.merge()
    for x in (xs(3, 1), xs(1, 2)):
        assert diff(ours, ref, x) <= TOL and diff(merged, ref, x) <= TOL
    assert diff(ours, model, xs(3, 1)) > 100 * TOL
    ours.save_adapter(tmp_path / "ours")
    back = PeftModel.from_pretrained(custom(kind)[0], tmp_path / "ours").eval()
    assert diff(back, ref, xs(3, 1)) == 0.0


# --- mixed batches, capacity -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_of_ia3_and_lora_rows_equals_each_alone(arch):
    pm = peftc.compile(make(arch), peftc.IA3(init_ia3_weights=False), adapter_name="ia3")
    pm.add_adapter("lora", peftc.LoRA(r=4, targets="all-linear"))
    randomize_ours_(pm, 1, name="lora")
    pm.add_adapter("ia3_in", peftc.IA3(targets="all-linear", feedforward=".*", init_ia3_weights=False))
    x = inputs(arch, batch=4)
    names = ["ia3", "lora", "__base__", "ia3_in"]
    mixed = out(lambda **k: pm(**k, adapter_names=names), x)
    for i, n in enumerate(names):
        if n == "__base__":
            with pm.disable_adapters():
                alone = out(pm, x)
        else:
            pm.set_adapter(n)
            alone = out(pm, x)
        assert (mixed[i] - alone[i]).abs().max().item() <= TOL, n
        assert n == "__base__" or (alone[i] - out(make(arch), x)[i]).abs().max() > 100 * TOL


@pytest.mark.slow
def test_switching_and_mixing_ia3_adapters_never_recompiles():
    pm = peftc.compile(make("llama"), peftc.IA3(init_ia3_weights=False), adapter_name="a").eval()
    pm.add_adapter("b", peftc.IA3(targets=["q_proj", "down_proj"], feedforward=[], init_ia3_weights=False))
    pm.add_adapter("c", peftc.LoRA(r=4))
    randomize_ours_(pm, 1, name="c")
    compiled = torch.compile(pm, backend="eager", fullgraph=True)
    x = inputs("llama")
    want = {}
    for n in ("a", "b", "c"):
        pm.set_adapter(n)
        want[n] = out(pm, x)
    pm.set_adapter("a")
    routes = (["a", "b", "c"], ["c", "a", "b"])
    out(compiled, x)                                                 # each form compiles once
    out(lambda **k: compiled(**k, adapter_names=routes[0]), x)
    with no_recompiles():
        for n in ("b", "c", "a"):
            pm.set_adapter(n)
            assert (out(compiled, x) - want[n]).abs().max() <= TOL
        for names in routes:
            got = out(lambda **k: compiled(**k, adapter_names=names), x)
            assert all((got[i] - want[n][i]).abs().max() <= TOL for i, n in enumerate(names))


def test_capacity_takes_and_frees_an_ia3_adapter():
    pm = peftc.compile(make("llama"), peftc.LoRA(r=4, targets=["q_proj", "k_proj", "v_proj"]),
                       capacity=peftc.Capacity(3, 8)).eval()
    randomize_ours_(pm, 1)
    x = inputs("llama")
    lora = out(pm, x)
    pm.add_adapter("ia3", peftc.IA3(init_ia3_weights=False))       # IA3 sites new to the graph: one rebuild
    assert pm.store.slots() == ["__base__", "default", "ia3", None]
    pm.set_adapter("ia3")
    alone = out(pm, x)
    mixed = out(lambda **k: pm(**k, adapter_names=["default", "ia3", "__base__"]), x)
    assert (mixed[0] - lora[0]).abs().max() <= TOL and (mixed[1] - alone[1]).abs().max() <= TOL
    pm.set_adapter("default")
    pm.delete_adapter("ia3")
    assert pm.store.slots() == ["__base__", "default", None, None]
    graph = pm.graph_module.graph
    pm.add_adapter("b", peftc.LoRA(r=8, targets=["q_proj"]))        # LoRA still comes in as data
    assert pm.graph_module.graph is graph
    randomize_ours_(pm, 2, name="b")
    pm.set_adapter("b")
    b = out(pm, x)
    mixed = out(lambda **k: pm(**k, adapter_names=["default", "b", "__base__"]), x)
    assert (mixed[0] - lora[0]).abs().max() <= TOL and (mixed[1] - b[1]).abs().max() <= TOL
    assert (mixed[2] - out(make("llama"), x)[2]).abs().max() <= TOL


def test_capacity_takes_ia3_adapters_as_data_once_the_graph_serves_them():
    """Once the graph scales IA3's sites, further IA3 adapters fill and leave slots as data (the graph object stays):
    each slot's IA3 lane is the adapter's vector, or frozen ones when it leaves; outputs equal each adapter alone."""
    x = inputs("llama")
    pm = peftc.compile(make("llama"), peftc.IA3(init_ia3_weights=False), capacity=peftc.Capacity(3)).eval()
    graph = pm.graph_module.graph
    pm.add_adapter("b", peftc.IA3(init_ia3_weights=False))
    pm.add_adapter("c", peftc.IA3(init_ia3_weights=False))
    assert pm.graph_module.graph is graph and pm.store.slots() == ["__base__", "default", "b", "c"]
    alone = {}
    for name in ("default", "b", "c"):
        pm.set_adapter(name)
        alone[name] = out(pm, x)
    mixed = out(lambda **k: pm(**k, adapter_names=["c", "default", "b"]), x)
    for i, name in enumerate(("c", "default", "b")):
        assert (mixed[i] - alone[name][i]).abs().max() <= TOL
    assert_differs(alone["b"], alone["c"])
    pm.set_adapter("default")
    pm.delete_adapter("b")                                          # its lane gets ones: slot 2 is the identity
    base = out(make("llama"), x)
    mixed = out(lambda **k: pm(**k, adapter_names=["c", "default", "__base__"]), x)
    assert (mixed[0] - alone["c"][0]).abs().max() <= TOL and (mixed[2] - base[2]).abs().max() <= TOL
    pm.add_adapter("d", peftc.IA3(init_ia3_weights=False))
    assert pm.graph_module.graph is graph and pm.store.slots() == ["__base__", "default", "d", "c"]
    pm.set_adapter("d")
    d = out(pm, x)
    mixed = out(lambda **k: pm(**k, adapter_names=["d", "c", "default"]), x)
    assert (mixed[0] - d[0]).abs().max() <= TOL and (mixed[1] - alone["c"][1]).abs().max() <= TOL


# --- training, counts ----------------------------------------------------------------------------------------------
def test_training_moves_only_the_vectors_and_the_loss_falls():
    model = make("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peftc.compile(model, peftc.IA3()).train()
    names = [n for n, _ in pm.named_trainable_parameters()]
    assert names and all(n.endswith(".l") for n in names)
    opt = torch.optim.Adam(pm.trainable_parameters(), lr=0.05)
    x = parity_inputs("llama", labels=True)[0]
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = pm(**x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any((p - 1).abs().max() > 1e-3 for p in pm.trainable_parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_parameter_counts_equal_peft(arch):
    pm = peftc.compile(make(arch), peftc.IA3())
    ad, method = pm.store["default"], method_of(peftc.IA3)
    counted = sum(method.param_count(ad.spec, pm.sites[p]) for p in ad.targets)
    ref = random_peft(arch)
    assert counted == pm.get_nb_trainable_parameters()[0] == ref.get_nb_trainable_parameters()[0]


# --- refusals ------------------------------------------------------------------------------------------------------
def test_feedforward_outside_the_targets_is_refused_naming_it():
    with pytest.raises(SpecError, match=r"feedforward modules \['down_proj'\] are not among targets"):
        peftc.IA3(targets=["k_proj", "v_proj"], feedforward=["down_proj"])
    with pytest.raises(ValueError, match="subset"):             # PEFT refuses the same
        IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    model = make("llama")
    pm = peftc.compile(model, peftc.IA3(init_ia3_weights=False))
    x = inputs("llama")
    y = out(pm, x)
    state = {k: v.clone() for k, v in pm.store.peft_state_dict("default").items()}
    with pytest.raises(SpecError, match=r"feedforward regex '\.\*mlp\.\*' matches none of its targets .*down_proj"):
        pm.add_adapter("bad", peftc.IA3(targets=["k_proj", "v_proj"], feedforward=".*mlp.*"))
    with pytest.raises(SpecError, match=r"feedforward modules \['up_proj'\] are not among its targets"):
        pm.add_adapter("bad", peftc.IA3(targets=".*(k|v)_proj", feedforward=["up_proj"]))
    assert pm.adapters == ["default"] and torch.equal(out(pm, x), y)
    assert all(torch.equal(v, state[k]) for k, v in pm.store.peft_state_dict("default").items())


def test_layers_ia3_does_not_serve_are_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 5, 2)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(SpecError, match=r"IA3 cannot serve 0 .*nn.Conv2d and nn.Conv3d"):
        peftc.compile(net, peftc.IA3(targets=["0", "2"], feedforward=[]), example_inputs=(torch.randn(2, 3, 7),))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    with pytest.raises(SpecError, match=r"IA3 cannot serve model.embed_tokens .*'embedding'.*\['linear', 'conv1d'"):
        peftc.compile(make("llama"), peftc.IA3(targets=["embed_tokens"], feedforward=[]))
    with pytest.raises(SpecError, match=r"IA3 cannot serve attn \(nn.MultiheadAttention"):
        peftc.compile(Attn().eval(), peftc.IA3(targets=["attn"], feedforward=[]),
                      example_inputs=(torch.randn(2, 3, 8),))
    with pytest.raises(SpecError, match=r"use_dora=True is an IA3 option peftc does not know"):
        peftc.load_adapter(make("llama"), _config_dir({"use_dora": True}))


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):                                    # (B, T, 8)
        return self.attn(x, x, x)[0]


def _config_dir(extra: dict):
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp())
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["k_proj"],
                                                       "feedforward_modules": [], **extra}))
    return d


def test_config_round_trip_keeps_every_field():
    spec = peftc.IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"], exclude_modules="x",
                     modules_to_save=["lm_head"], init_ia3_weights=False, fan_in_fan_out=True)
    cfg = method_of(spec).to_config(spec, target_modules=list(spec.targets), base_model_name_or_path=None,
                                    task_type=None, modules_to_save=spec.modules_to_save)
    assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"] == ["down_proj"]
    IA3Config(**{k: v for k, v in cfg.items() if k != "peft_type"})          # PEFT takes every field
    assert method_of(spec).from_config(cfg, "x") == spec
